"""Storage URIs: what a URI names. :func:`parse_uri` turns a path, ``file://PATH``, ``s3://bucket/key`` or
``bundled://NAME`` into a :class:`Loc` (backend kind plus local path or bucket and key), rejecting unknown
schemes and bad corpus names; a ``Loc`` also says how to name an S3 key under it as a folder/prefix (whether
it may be written is its backend's concern: ``lm.storage.bundled`` is read-only). Bundled corpora are the
``lm/corpora/NAME.txt.gz`` (text) and ``NAME.jsonl.gz`` (records, e.g. supervised fine-tuning data) files
shipped with the package."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from lm.storage.errors import StorageError

CORPORA = Path(__file__).parents[1] / "corpora"
BUNDLED_SUFFIXES = (".txt.gz", ".jsonl.gz")


@dataclass(frozen=True)
class Loc:
    uri: str
    kind: str  # "local" | "s3" | "bundled"
    path: Path = Path()
    bucket: str = ""
    key: str = ""

    def key_of(self, rel: str) -> str:
        """The S3 key of ``rel`` (relative to this location taken as a folder/prefix)."""
        return f"{self.key}/{rel}" if self.key else rel


def parse_uri(uri: str | os.PathLike) -> Loc:
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket name in the S3 URI")
        return Loc(uri, "s3", bucket=bucket, key=key.strip("/"))
    if uri.startswith("bundled://"):
        name = uri[10:].strip("/")
        if name and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
            raise StorageError(f"{uri}: invalid bundled corpus name")
        return Loc(uri, "bundled", path=_bundled_path(name) if name else CORPORA)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a path, file://, s3:// or bundled://)")
    return Loc(uri, "local", path=Path(uri.removeprefix("file://")).expanduser())


def _bundled_path(name: str) -> Path:
    """The file of bundled corpus ``name`` (the .txt.gz one when there is none, so a miss names it)."""
    found = [path for suffix in BUNDLED_SUFFIXES if (path := CORPORA / f"{name}{suffix}").is_file()]
    return found[0] if found else CORPORA / f"{name}{BUNDLED_SUFFIXES[0]}"


def bundled_names() -> list[str]:
    """The names of the bundled corpora, sorted."""
    names = (p.name.removesuffix(suffix) for suffix in BUNDLED_SUFFIXES for p in CORPORA.glob(f"*{suffix}"))
    return sorted(names)
