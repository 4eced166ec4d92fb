"""The storage backend protocol: the raw operations one URI kind provides, which :class:`ObjectStore` picks
once per parsed URI (local folders in ``local``, S3 in ``s3``, the read-only ``bundled://`` corpora in
``bundled``). Backends do the work and raise what their library raises (OS or boto errors, or
:class:`StorageError` for a write to a read-only URI); the store turns those into errors naming the URI,
runs the parallel helpers and owns publishing (the ``_PUBLISHED.json`` marker). Also :class:`Staged`, the
parts of a file being written, and :func:`save_stream`, shared by backends that fetch a file by streaming."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, runtime_checkable

from lm.storage.streams import MIB
from lm.storage.uri import Loc


class Staged(NamedTuple):
    """A file being written: fill ``file``; ``commit(file)`` makes it appear whole, ``discard()`` drops it."""

    file: IO[bytes]
    commit: Callable[[IO[bytes]], None]
    discard: Callable[[], None]


def save_stream(src: IO[bytes], dst: Path) -> None:
    """Copy the stream ``src`` (then closed) into the local file ``dst``, chunk by chunk."""
    with src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out, MIB)


@runtime_checkable
class Backend(Protocol):
    """What one URI kind does. ``loc`` is a parsed URI of this backend's kind; a ``loc`` "as a folder" covers
    the files under it (``s3://b/p`` covers ``p/...``, never ``p2``) and ``rel`` names one relative to it.
    A read-only backend raises :class:`StorageError` naming the URI from every method that writes."""

    read_only: bool  # True: holds no writable (so no published) files; every write raises StorageError

    def require_writable(self, loc: Loc) -> None:
        """Raise StorageError naming the URI if ``loc`` cannot be written."""
        ...

    def exists(self, loc: Loc) -> bool:
        """True if a file/object (not a folder/prefix) is at ``loc``."""
        ...

    def rels(self, loc: Loc, recursive: bool) -> list[str]:
        """Names under ``loc`` as a folder, relative to it, sorted (non-recursive: sub-folders end in '/')."""
        ...

    def child_uri(self, loc: Loc, rel: str) -> str:
        """The URI of ``rel`` under ``loc`` as a folder."""
        ...

    def etags(self, loc: Loc) -> dict[str, str]:
        """``rel`` -> a version tag (changes when the file is rewritten) of every file under ``loc``."""
        ...

    def open_read(self, loc: Loc) -> IO[bytes]:
        """A binary stream of the file's content."""
        ...

    def open_write(self, loc: Loc) -> Staged:
        """A new file for ``loc`` that appears whole on commit, or not at all."""
        ...

    def put_file(self, src: Path, loc: Loc) -> None:
        """Upload/copy the local file ``src`` to ``loc``; it appears whole or not at all."""
        ...

    def get_file(self, loc: Loc, dst: Path) -> None:
        """Download/copy the file at ``loc`` into the local file ``dst`` (a temp file the store moves)."""
        ...

    def create_if_absent(self, loc: Loc, data: bytes) -> bool:
        """Write ``data`` at ``loc`` only if nothing is there yet, atomically; False if something was."""
        ...

    def server_copy(self, src: Loc, dst: Loc) -> bool:
        """Copy ``src`` to ``dst`` (both of this backend) without passing the bytes through this process;
        False where this backend has no such copy (the store then copies via a local file or a stream)."""
        ...

    def delete(self, loc: Loc) -> int:
        """Delete the file at ``loc`` and everything under it as a folder; the number of files deleted."""
        ...

    def delete_files(self, loc: Loc, rels: list[str]) -> None:
        """Delete the files ``rels`` under ``loc`` as a folder (missing ones are fine)."""
        ...

    def swap_in_dir(self, loc: Loc, fill: Callable[[str], None]) -> bool:
        """Build a folder with ``fill(uri of a temp folder)`` and swap it in for ``loc`` whole (the old one
        stays if anything fails); False where this backend cannot swap folders (nothing is done then)."""
        ...

    def local_path(self, loc: Loc) -> Path | None:
        """The file or folder on this machine behind ``loc`` as stored (bundled: the .gz); None if remote."""
        ...

    def plain_path(self, loc: Loc) -> Path | None:
        """The local file holding exactly the bytes ``open_read`` gives, if there is one (else None)."""
        ...

    def pyarrow_filesystem(self, loc: Loc) -> tuple[Any, str]:
        """``(pyarrow.fs.FileSystem, path)`` that reads ``loc`` as stored."""
        ...
