"""The local-folder backend (:class:`LocalBackend`, for paths and ``file://`` URIs) and its helpers:
everything that touches the local filesystem directly. Writes never show half a file or folder: a file is
written to a hidden temp sibling (``.lmtmp-…``, skipped by every listing) and moved into place with
``os.replace`` (:func:`atomic_path`), and a folder is built in a temp sibling and swapped in by rename
(:func:`replace_dir`). Also listing, recursive delete and sha256 of local files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lm.storage.backend import Staged, save_stream
from lm.storage.streams import MIB
from lm.storage.uri import Loc
from lm.uri import join_uri

TMP = ".lmtmp-"  # prefix of in-flight temp siblings; listings hide them


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def files(root: Path) -> list[str]:
    """Relative posix paths of every file under ``root``, sorted, temp siblings skipped."""
    rels = (p.relative_to(root) for p in root.rglob("*") if p.is_file()) if root.is_dir() else ()
    return sorted(r.as_posix() for r in rels if not any(part.startswith(TMP) for part in r.parts))


def children(root: Path) -> list[str]:
    """Names directly under ``root``, sorted, sub-folders ending in '/', temp siblings skipped."""
    kids = root.iterdir() if root.is_dir() else ()
    return sorted(p.name + "/" * p.is_dir() for p in kids if not p.name.startswith(TMP))


def tmp_sibling(path: Path, tag: str = "") -> Path:
    return path.parent / f"{TMP}{tag}{path.name}-{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp sibling of ``path`` to fill; moved onto ``path`` if the block succeeds, removed either way."""
    tmp = tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def create_if_absent(path: Path, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there, atomically (filled in a temp sibling, then
    hard-linked into place: ``link`` fails if the name exists); False if it was already there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def replace_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp)`` in a temp sibling, then swap it in for ``target`` (the old version
    is moved aside, then removed); if anything fails, ``target`` is left as it was."""
    tmp, old = tmp_sibling(target), tmp_sibling(target, "old-")
    try:
        tmp.mkdir(parents=True)
        fill(tmp)
        if moved := target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if moved:
                os.replace(old, target)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def delete_path(path: Path) -> int:
    """Delete a file or a whole folder; returns the number of files removed."""
    if path.is_dir():
        count = len(files(path))
        shutil.rmtree(path)
        return count
    if path.is_file() or path.is_symlink():
        path.unlink()
        return 1
    return 0


class LocalBackend:
    """Paths and ``file://`` URIs: files in a local folder (see the module doc for how writes stay whole)."""

    read_only = False

    def require_writable(self, loc: Loc) -> None:
        pass

    def exists(self, loc: Loc) -> bool:
        return loc.path.is_file()

    def rels(self, loc: Loc, recursive: bool) -> list[str]:
        return files(loc.path) if recursive else children(loc.path)

    def child_uri(self, loc: Loc, rel: str) -> str:
        return join_uri(loc.uri, rel)

    def etags(self, loc: Loc) -> dict[str, str]:
        """Size and modification time of every file under ``loc``."""
        stats = {rel: (loc.path / rel).stat() for rel in files(loc.path)}
        return {rel: f"{st.st_size}-{st.st_mtime_ns}" for rel, st in stats.items()}

    def open_read(self, loc: Loc) -> IO[bytes]:
        return open(loc.path, "rb")

    def open_write(self, loc: Loc) -> Staged:
        """A temp sibling of ``loc``'s file, moved onto it on commit."""
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_sibling(loc.path)
        out = open(tmp, "wb")  # noqa: SIM115 (closed on commit, or by the Writer on discard)

        def replace(f: IO[bytes]) -> None:
            f.close()
            os.replace(tmp, loc.path)

        return Staged(out, replace, lambda: tmp.unlink(missing_ok=True))

    def put_file(self, src: Path, loc: Loc) -> None:
        loc.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(loc.path) as tmp:
            shutil.copyfile(src, tmp)

    def get_file(self, loc: Loc, dst: Path) -> None:
        save_stream(self.open_read(loc), dst)

    def create_if_absent(self, loc: Loc, data: bytes) -> bool:
        return create_if_absent(loc.path, data)

    def server_copy(self, src: Loc, dst: Loc) -> bool:
        return False  # the store copies the plain file with put_file

    def delete(self, loc: Loc) -> int:
        return delete_path(loc.path)

    def delete_files(self, loc: Loc, rels: list[str]) -> None:
        for rel in rels:
            (loc.path / rel).unlink(missing_ok=True)

    def swap_in_dir(self, loc: Loc, fill: Callable[[str], None]) -> bool:
        replace_dir(loc.path, lambda tmp: fill(str(tmp)))
        return True

    def local_path(self, loc: Loc) -> Path | None:
        return loc.path

    def plain_path(self, loc: Loc) -> Path | None:
        return loc.path

    def pyarrow_filesystem(self, loc: Loc) -> tuple[Any, str]:
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(loc.path.absolute())
