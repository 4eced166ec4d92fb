"""The source objects a data directory was made from, as the manifest records them (per source): for
the provenance chain (``lm lineage``) and its ``--verify``.

* S3: the key's URI, size and ETag (one listing per prefix, no object is read again);
* a local file: its absolute path, size, modification time and SHA-256 of its bytes (read once, on the
  driver, while the pipeline plans; ~1 GB/s, so a large local corpus pays one extra read);
* ``bundled://`` corpora: the ``.gz`` file shipped in the package, as a local file.

    objects = source_objects(store, files)      # files: lm.data.sources.plan_files's tasks
    changed = check_object(store, objects["tinyshakespeare"][0])    # "" when it is still the same
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict

from lm.storage import ObjectStore, StorageError
from lm.uri import absolute_uri

_MIB = 1 << 20


class SourceObject(BaseModel):
    """One object a source named, as it was when the data was made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uri: str
    size: int  # bytes (-1: unknown)
    etag: str | None = None  # S3
    mtime: float | None = None  # local: seconds since the epoch
    sha256: str | None = None  # local: of the stored bytes (a .gz file's compressed bytes)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_MIB):
            digest.update(chunk)
    return digest.hexdigest()


def describe(store: ObjectStore, uri: str, etags: dict[str, str] | None = None) -> SourceObject:
    """``uri`` as it is now (``etags``: the S3 listing of its prefix, when already made)."""
    path = store.local_path(uri)
    if path is not None:
        st = path.stat()
        return SourceObject(uri=absolute_uri(uri), size=st.st_size, mtime=st.st_mtime, sha256=file_sha256(path))
    if etags is None:
        etags = store.list_etags(uri.rsplit("/", 1)[0] + "/")
    if uri not in etags:
        raise StorageError(f"{uri}: no such object")
    fs, key = store.pyarrow_filesystem(uri)
    size = fs.get_file_info(key).size
    return SourceObject(uri=uri, size=-1 if size is None else size, etag=etags[uri])


def source_objects(store: ObjectStore, files: Iterable[dict]) -> dict[str, list[SourceObject]]:
    """Source name -> its objects (in plan order), for the planned ``files`` (uri, source, size)."""
    listings: dict[str, dict[str, str]] = {}
    out: dict[str, list[SourceObject]] = {}
    for f in files:
        uri = f["uri"]
        if store.local_path(uri) is not None:
            obj = describe(store, uri)
        else:
            prefix = uri.rsplit("/", 1)[0] + "/"
            if prefix not in listings:
                listings[prefix] = store.list_etags(prefix)
            obj = SourceObject(uri=uri, size=f.get("size", -1), etag=listings[prefix].get(uri))
        out.setdefault(f["source"], []).append(obj)
    return out


def check_object(store: ObjectStore, recorded: SourceObject, listings: dict[str, dict[str, str]] | None = None) -> str:
    """What differs between ``recorded`` and the object now ("" when nothing: same content hash, or same ETag).
    ``listings``: S3 listings by prefix, kept between calls (one listing per prefix, not per object)."""
    try:
        etags = None
        if recorded.etag is not None and listings is not None:
            prefix = recorded.uri.rsplit("/", 1)[0] + "/"
            etags = listings[prefix] if prefix in listings else listings.setdefault(prefix, store.list_etags(prefix))
        now = describe(store, recorded.uri, etags)
    except (OSError, StorageError) as err:
        return f"cannot be read now: {err}"
    if recorded.sha256 is not None and now.sha256 != recorded.sha256:
        return f"sha256 {recorded.sha256[:12]}… is now {(now.sha256 or '?')[:12]}…"
    if recorded.etag is not None and now.etag != recorded.etag:
        return f"ETag {recorded.etag} is now {now.etag}"
    if recorded.size >= 0 and now.size >= 0 and now.size != recorded.size:
        return f"size {recorded.size} is now {now.size}"
    return ""
