"""The :class:`ObjectStore` facade: one API over every URI kind. It parses each URI and hands the work to that
kind's :class:`~lm.storage.backend.Backend` (``local``, ``s3`` or the read-only ``bundled``), is the single
place where boto/OS errors become :class:`StorageError` naming the URI, runs transfers of many files in
parallel, and owns publishing: single files that appear whole or not at all, and ``publish_dir`` /
``is_published`` / ``read_published_listing`` / ``download_dir``, which use the ``_PUBLISHED.json`` marker
(:data:`MARKER`) so a reader never sees a mix of two versions."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from lm.config import StorageConfig, join_uri
from lm.storage import local
from lm.storage.backend import Backend
from lm.storage.bundled import BundledBackend
from lm.storage.errors import StorageError, StorageNotFound
from lm.storage.local import LocalBackend
from lm.storage.s3 import BOTO_ERRORS, S3, S3Backend
from lm.storage.streams import MIB, Writer
from lm.storage.uri import Loc, parse_uri

MARKER = "_PUBLISHED.json"


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
        list(pool.map(fn, items))


class ObjectStore:
    """Read, write, list, copy, delete and atomically publish files behind URIs (see the package doc)."""

    def __init__(self, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        self._s3 = S3(self.cfg)
        self._backends: dict[str, Backend] = {
            "local": LocalBackend(), "s3": S3Backend(self._s3), "bundled": BundledBackend()}

    def __repr__(self) -> str:
        return f"ObjectStore(root={self.cfg.root!r}, endpoint={self._s3.endpoint()!r})"

    # ------------------------------------------------------------------------------------ plumbing

    def client(self) -> Any:
        """This store's boto3 S3 client (created on first use; thread-safe)."""
        return self._s3.client()

    def _backend(self, loc: Loc) -> Backend:
        """The backend for the URI kind of ``loc``."""
        return self._backends[loc.kind]

    @contextlib.contextmanager
    def _errors(self, uri: str, bucket: str = "") -> Iterator[None]:
        """Turn boto/OS errors into StorageError / StorageNotFound naming ``uri`` (never a secret)."""
        try:
            yield
        except StorageError:
            raise
        except BOTO_ERRORS as err:
            raise self._s3.translate(err, uri, bucket) from err
        except FileNotFoundError as err:
            raise StorageNotFound(f"{uri}: no such file or object") from err
        except OSError as err:
            raise StorageError(f"{uri}: {err.strerror or err}") from err

    def _rels(self, loc: Loc, recursive: bool = True) -> list[str]:
        """Names under ``loc`` as a folder, relative to it, sorted (non-recursive: sub-folders end in '/')."""
        with self._errors(loc.uri, loc.bucket):
            return self._backend(loc).rels(loc, recursive)

    def _put_file(self, src: Path, uri: str) -> None:
        """Upload/copy one local file to ``uri``; it appears whole or not at all."""
        loc = parse_uri(uri)
        with self._errors(uri, loc.bucket):
            self._backend(loc).put_file(src, loc)

    def _put_files(self, src: Path, rels: list[str], uri: str) -> None:
        """``_put_file`` each ``src/<rel>`` to ``uri/<rel>``, in parallel."""
        _parallel(lambda rel: self._put_file(src / rel, join_uri(uri, rel)), rels)

    def _get_file(self, uri: str, dst: Path) -> None:
        """Download/copy one object to the local file ``dst`` (atomically replaced)."""
        loc = parse_uri(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(uri, loc.bucket), local.atomic_path(dst) as tmp:
            self._backend(loc).get_file(loc, tmp)

    # ------------------------------------------------------------------------------- public API

    def exists(self, uri: str) -> bool:
        """True if a file/object (not a folder/prefix) is at ``uri``; a missing bucket is a StorageError."""
        loc = parse_uri(uri)
        try:
            with self._errors(uri, loc.bucket):
                return self._backend(loc).exists(loc)
        except StorageNotFound:
            return False

    def list(self, uri_prefix: str, recursive: bool = True) -> list[str]:
        """Full URIs of the files under a folder/prefix, sorted; non-recursive adds sub-folders ('…/')."""
        loc = parse_uri(uri_prefix)
        backend = self._backend(loc)
        return [backend.child_uri(loc, rel) + "/" * rel.endswith("/") for rel in self._rels(loc, recursive)]

    def list_etags(self, uri_prefix: str) -> dict[str, str]:
        """Full URI -> a version tag of every file under a folder/prefix: the S3 ETag, or size and
        modification time for a local file (a rewritten object gets a new tag)."""
        loc = parse_uri(uri_prefix)
        backend = self._backend(loc)
        with self._errors(uri_prefix, loc.bucket):
            return {backend.child_uri(loc, rel): tag for rel, tag in sorted(backend.etags(loc).items())}

    def open(self, uri: str, mode: str = "rb") -> IO[bytes]:
        """A binary stream: ``rb`` streams the object; ``wb`` makes it appear whole on a clean close."""
        loc = parse_uri(uri)
        backend = self._backend(loc)
        if mode == "rb":
            with self._errors(uri, loc.bucket):
                return backend.open_read(loc)
        if mode != "wb":
            raise ValueError(f"open({uri!r}): mode must be 'rb' or 'wb', got {mode!r}")
        with self._errors(uri, loc.bucket):
            staged = backend.open_write(loc)

        def commit(f: IO[bytes]) -> None:
            with self._errors(uri, loc.bucket):
                staged.commit(f)

        return Writer(staged.file, commit, staged.discard)  # type: ignore[return-value]

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri, "rb") as f, self._errors(uri):
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open(uri, "wb") as f:
            f.write(data)

    def create_if_absent(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if nothing is there yet, as one atomic step (S3: a conditional
        PUT; a folder: a hard link); False if something was. Two writers racing for the same name: one
        wins, the other gets False. The building block of the registry's compare-and-swap."""
        loc = parse_uri(uri)
        with self._errors(uri, loc.bucket):
            return self._backend(loc).create_if_absent(loc, data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def open_text(self, uri: str) -> Iterator[str]:
        """Stream a text object's lines (utf-8, line ending stripped); ``*.gz`` is gunzipped on the fly."""
        raw = self.open(uri, "rb")  # opened now, so a missing object fails here, not at the first next()

        def lines() -> Iterator[str]:
            stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
            with raw, self._errors(uri), io.TextIOWrapper(stream, encoding="utf-8") as text:  # type: ignore[arg-type]
                for line in text:
                    yield line.removesuffix("\n")

        return lines()

    def copy(self, src: str, dst: str) -> None:
        """Copy one file/object: local↔S3, S3→S3 (server side), bundled→anywhere."""
        s, d = parse_uri(src), parse_uri(dst)
        source, target = self._backend(s), self._backend(d)
        target.require_writable(d)
        if source is target:
            with self._errors(f"{src} -> {dst}", s.bucket):
                if source.server_copy(s, d):
                    return
        if (path := source.plain_path(s)) is not None:  # a local file: upload/copy it
            if not path.is_file():
                raise StorageNotFound(f"{src}: no such file")
            self._put_file(path, dst)
        elif (path := target.plain_path(d)) is not None:  # into a local file: download it
            self._get_file(src, path)
        else:
            with self.open(src, "rb") as r, self.open(dst, "wb") as w:
                shutil.copyfileobj(r, w, MIB)

    def delete(self, uri: str) -> int:
        """Delete a file/object and everything under it as a folder/prefix; returns the number of files."""
        loc = parse_uri(uri)
        with self._errors(uri, loc.bucket):
            return self._backend(loc).delete(loc)

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Fetch a folder/prefix into ``local_dir``; a published one yields exactly its verified listing."""
        dest = Path(local_dir)
        listing = self.read_published_listing(uri) if self.is_published(uri) else None
        rels = [f["path"] for f in listing["files"]] if listing else self._rels(parse_uri(uri))
        _parallel(lambda rel: self._get_file(join_uri(uri, rel), dest / rel), rels)
        if listing:
            for f in listing["files"]:
                if local.sha256(dest / f["path"]) != f["sha256"]:
                    raise StorageError(
                        f"{uri}: {f['path']} does not match {MARKER} (re-published meanwhile?)")
            (dest / MARKER).write_text(json.dumps(listing, indent=2))
        return dest

    def upload_dir(self, local_dir: str | Path, uri: str) -> int:
        """Copy every file under ``local_dir`` to ``uri/<relative path>`` (no marker); returns the count."""
        src = Path(local_dir)
        rels = local.files(src)
        self._put_files(src, rels, uri)
        return len(rels)

    def local_path(self, uri: str) -> Path | None:
        """The local Path behind a path/file:// or bundled:// URI (bundled: the .gz file); None for S3."""
        loc = parse_uri(uri)
        return self._backend(loc).local_path(loc)

    def pyarrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """``(pyarrow.fs.FileSystem, path)`` for ``uri`` with this store's settings (e.g. for Ray Data)."""
        loc = parse_uri(uri)
        return self._backend(loc).pyarrow_filesystem(loc)

    def create_bucket(self, name: str) -> str:
        """Create an S3 bucket (fine if this account already owns it); returns ``s3://name``."""
        with self._errors(f"s3://{name}", name):
            self._s3.create_bucket(name)
        return f"s3://{name}"

    # ----------------------------------------------------------------------------- publishing

    def publish_file(self, src: bytes | str | Path, uri: str) -> None:
        """Write ``src`` (bytes, or a local file's path) to ``uri``: readers see old or new, never half."""
        if isinstance(src, bytes | bytearray | memoryview):
            return self.write_bytes(uri, bytes(src))
        if not Path(src).is_file():
            raise StorageNotFound(f"{src}: no such file to publish")
        self._put_file(Path(src), uri)

    def publish_dir(self, local_dir: str | Path, uri: str) -> dict[str, Any]:
        """Publish a local folder at ``uri`` atomically (see the package doc); returns the marker listing."""
        src, loc = Path(local_dir), parse_uri(uri)
        backend = self._backend(loc)
        backend.require_writable(loc)
        if not src.is_dir():
            raise StorageNotFound(f"{src}: no such folder to publish")
        rels = [r for r in local.files(src) if r != MARKER]
        files = [{"path": r, "size": (src / r).stat().st_size, "sha256": local.sha256(src / r)} for r in rels]
        listing = {"format": "lmforge-published/1", "published_at": time.time(), "files": files}
        marker = json.dumps(listing, indent=2).encode()

        def fill(tmp_uri: str) -> None:
            self._put_files(src, rels, tmp_uri)
            self.write_bytes(join_uri(tmp_uri, MARKER), marker)

        with self._errors(uri, loc.bucket):
            if backend.swap_in_dir(loc, fill):  # a local folder: built aside, swapped in whole
                return listing
        # No folder swap (S3): the marker goes last, so readers see the old version, none, or the new one.
        marker_uri = join_uri(uri, MARKER)
        self.delete(marker_uri)  # from here on readers see "not published", never a mix
        self._put_files(src, rels, uri)
        self.write_bytes(marker_uri, marker)
        stale = set(self._rels(loc)) - set(rels) - {MARKER}
        with self._errors(uri, loc.bucket):
            backend.delete_files(loc, sorted(stale))
        return listing

    def is_published(self, uri: str) -> bool:
        """True if ``uri`` holds a complete ``publish_dir`` (its marker exists)."""
        return not self._backend(parse_uri(uri)).read_only and self.exists(join_uri(uri, MARKER))

    def read_published_listing(self, uri: str) -> dict[str, Any]:
        """The marker of a published folder: ``{"files": [{"path", "size", "sha256"}, ...], ...}``."""
        try:
            return json.loads(self.read_text(join_uri(uri, MARKER)))
        except StorageNotFound:
            raise StorageNotFound(f"{uri}: not published (no {MARKER})") from None
