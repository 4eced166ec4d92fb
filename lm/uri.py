"""URI and path helpers every package may use (a leaf: it imports nothing of lm): join segments, and make a
relative local path absolute. What a URI names (backend, bucket, key) is lm.storage.uri's concern."""

from __future__ import annotations

from pathlib import Path


def join_uri(base: str, *parts: str) -> str:
    """Join URI/path segments with single slashes (works for s3://, file:// and local paths)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def absolute_uri(uri: str) -> str:
    """``uri`` with a relative local path made absolute against the current directory (other URIs as
    they are), so it means the same thing in Ray workers, whose working directory differs."""
    if "://" in uri and not uri.startswith("file://"):  # s3://, bundled://: not a local path
        return uri
    path = Path(uri.removeprefix("file://")).expanduser()
    return uri if path.is_absolute() else str(path.resolve())
