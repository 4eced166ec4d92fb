"""URI and path helpers every package may use (a leaf: it imports nothing of lm): join segments, and make a
relative local path absolute. What a URI names (backend, bucket, key) is lm.storage.uri's concern."""

from __future__ import annotations

import re
from pathlib import Path

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # s3://, bundled://, registry:<ref> (two letters at least)


def join_uri(base: str, *parts: str) -> str:
    """Join URI/path segments with single slashes (works for s3://, file:// and local paths)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute against the current directory (a URI with a scheme
    other than file://, such as s3://, bundled:// or registry:<ref>, as it is; a trailing slash kept), so
    it means the same thing in Ray workers, whose working directory differs."""
    if _SCHEME.match(uri) and not uri.startswith("file://"):  # not a local path
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    if path.is_absolute():
        return uri
    return str(path.resolve()) + ("/" if uri.endswith("/") else "")  # a folder prefix stays one
