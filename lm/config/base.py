"""The base of every config section, the error a bad config raises, and the marker of the fields that
hold a local path or URI (:data:`PATH`), from which :func:`absolute_paths` finds every path to resolve.

    class RagConfig(Section):
        index: Annotated[str | None, PATH] = Field(None, description=...)   # a path: made absolute
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict

from lm.uri import absolute_uri


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, the key and the problem."""


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class PathMarker:
    """Marks a string field holding a local path or URI (``Annotated[str | None, PATH]``); ``keep``: values
    that are names, not paths (``builtin``), left as they are."""

    keep: tuple[str, ...] = ()


PATH = PathMarker()
S = TypeVar("S", bound=Section)


def absolute_paths(section: S) -> S:
    """A copy of ``section`` whose path fields (marked :data:`PATH`), in it and in every sub-section (lists
    and dicts of sections included), hold absolute paths: a relative local path is made absolute against
    the current directory; a URI with a scheme (s3://, bundled://, registry:<ref>), None and "" are kept."""
    update: dict[str, Any] = {}
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        marker = next((m for m in info.metadata if isinstance(m, PathMarker)), None)
        if marker is not None and isinstance(value, str) and value and value not in marker.keep:
            new = absolute_uri(value)
        elif isinstance(value, Section):
            new = absolute_paths(value)
        elif isinstance(value, list) and any(isinstance(v, Section) for v in value):
            new = [absolute_paths(v) if isinstance(v, Section) else v for v in value]
        elif isinstance(value, dict) and any(isinstance(v, Section) for v in value.values()):
            new = {k: absolute_paths(v) if isinstance(v, Section) else v for k, v in value.items()}
        else:
            continue
        if new != value:
            update[name] = new
    return section.model_copy(update=update) if update else section
