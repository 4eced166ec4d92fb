"""The ``bundled://`` backend (:class:`BundledBackend`): the corpora shipped in ``lm/corpora`` (see
:mod:`lm.storage.uri`), read as their decompressed content and never written: every write raises
:class:`StorageError` naming the URI. ``bundled://`` as a folder lists every corpus as ``bundled://NAME``."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lm.storage.backend import Staged, save_stream
from lm.storage.errors import StorageError
from lm.storage.uri import CORPORA, Loc, bundled_names


def read_only_error(loc: Loc) -> StorageError:
    return StorageError(f"{loc.uri}: bundled:// corpora are read-only")


class BundledBackend:
    """Read-only ``bundled://NAME`` corpora: reads gunzip ``lm/corpora/NAME.*.gz``; writes raise."""

    read_only = True

    def require_writable(self, loc: Loc) -> None:
        raise read_only_error(loc)

    def exists(self, loc: Loc) -> bool:
        return loc.path.is_file()

    def rels(self, loc: Loc, recursive: bool) -> list[str]:
        """The corpus names under ``bundled://`` (a corpus itself holds nothing)."""
        return bundled_names() if loc.path == CORPORA else []

    def child_uri(self, loc: Loc, rel: str) -> str:
        return f"bundled://{rel}"

    def etags(self, loc: Loc) -> dict[str, str]:
        return {rel: "bundled" for rel in self.rels(loc, recursive=True)}

    def open_read(self, loc: Loc) -> IO[bytes]:
        return gzip.open(loc.path, "rb")  # type: ignore[return-value]

    def open_write(self, loc: Loc) -> Staged:
        raise read_only_error(loc)

    def put_file(self, src: Path, loc: Loc) -> None:
        raise read_only_error(loc)

    def get_file(self, loc: Loc, dst: Path) -> None:
        save_stream(self.open_read(loc), dst)

    def create_if_absent(self, loc: Loc, data: bytes) -> bool:
        raise read_only_error(loc)

    def server_copy(self, src: Loc, dst: Loc) -> bool:
        raise read_only_error(dst)

    def delete(self, loc: Loc) -> int:
        raise read_only_error(loc)

    def delete_files(self, loc: Loc, rels: list[str]) -> None:
        raise read_only_error(loc)

    def swap_in_dir(self, loc: Loc, fill: Callable[[str], None]) -> bool:
        raise read_only_error(loc)

    def local_path(self, loc: Loc) -> Path | None:
        return loc.path  # the .gz file

    def plain_path(self, loc: Loc) -> Path | None:
        return None  # the file is gzipped; its bytes are not the corpus's

    def pyarrow_filesystem(self, loc: Loc) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(loc.path.absolute())
