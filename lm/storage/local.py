"""Local-folder backend helpers: everything that touches the local filesystem directly. Writes never show
half a file or folder: a file is written to a hidden temp sibling (``.lmtmp-…``, skipped by every listing)
and moved into place with ``os.replace`` (:func:`atomic_path`), and a folder is built in a temp sibling and
swapped in by rename (:func:`replace_dir`). Also listing, recursive delete and sha256 of local files."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from lm.storage.streams import MIB

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
