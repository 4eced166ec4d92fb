"""The :class:`ObjectStore` facade: one API over every URI kind. It parses each URI, dispatches to the local
helpers (``local``) or the S3 backend (``s3``), is the single place where boto/OS errors become
:class:`StorageError` naming the URI, and owns publishing: single files that appear whole or not at all,
and ``publish_dir`` / ``is_published`` / ``read_published_listing`` / ``download_dir``, which use the
``_PUBLISHED.json`` marker (:data:`MARKER`) so a reader never sees a mix of two versions."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from lm.config import StorageConfig, join_uri
from lm.storage import local
from lm.storage.errors import StorageError, StorageNotFound
from lm.storage.s3 import BOTO_ERRORS, S3
from lm.storage.streams import MIB, Writer
from lm.storage.uri import CORPORA, Loc, bundled_names, parse_uri

MARKER = "_PUBLISHED.json"


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
        list(pool.map(fn, items))


class ObjectStore:
    """Read, write, list, copy, delete and atomically publish files behind URIs (see the package doc)."""

    def __init__(self, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        self._s3 = S3(self.cfg)

    def __repr__(self) -> str:
        return f"ObjectStore(root={self.cfg.root!r}, endpoint={self._s3.endpoint()!r})"

    # ------------------------------------------------------------------------------------ plumbing

    def client(self) -> Any:
        """This store's boto3 S3 client (created on first use; thread-safe)."""
        return self._s3.client()

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
        if loc.kind == "bundled":
            return bundled_names() if loc.path == CORPORA else []
        if loc.kind == "local":
            return local.files(loc.path) if recursive else local.children(loc.path)
        with self._errors(loc.uri, loc.bucket):
            return self._s3.rels(loc, recursive)

    def _put_file(self, src: Path, uri: str) -> None:
        """Upload/copy one local file to ``uri``; it appears whole or not at all."""
        loc = parse_uri(uri)
        loc.require_writable()
        with self._errors(uri, loc.bucket):
            if loc.kind == "s3":
                return self._s3.put_file(src, loc)
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            with local.atomic_path(loc.path) as tmp:
                shutil.copyfile(src, tmp)

    def _put_files(self, src: Path, rels: list[str], uri: str) -> None:
        """``_put_file`` each ``src/<rel>`` to ``uri/<rel>``, in parallel."""
        _parallel(lambda rel: self._put_file(src / rel, join_uri(uri, rel)), rels)

    def _get_file(self, uri: str, dst: Path) -> None:
        """Download/copy one object to the local file ``dst`` (atomically replaced)."""
        loc = parse_uri(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with self._errors(uri, loc.bucket), local.atomic_path(dst) as tmp:
            if loc.kind == "s3":
                self._s3.get_file(loc, tmp)
            else:
                with self.open(uri, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, MIB)

    def _delete_keys(self, loc: Loc, keys: list[str]) -> None:
        with self._errors(loc.uri, loc.bucket):
            self._s3.delete_keys(loc, keys)

    # ------------------------------------------------------------------------------- public API

    def exists(self, uri: str) -> bool:
        """True if a file/object (not a folder/prefix) is at ``uri``; a missing bucket is a StorageError."""
        loc = parse_uri(uri)
        if loc.kind != "s3":
            return loc.path.is_file()
        try:
            with self._errors(uri, loc.bucket):
                return self._s3.exists(loc)
        except StorageNotFound:
            return False

    def list(self, uri_prefix: str, recursive: bool = True) -> list[str]:
        """Full URIs of the files under a folder/prefix, sorted; non-recursive adds sub-folders ('…/')."""
        loc = parse_uri(uri_prefix)
        if loc.kind == "bundled":
            return [f"bundled://{rel}" for rel in self._rels(loc)]
        base = uri_prefix.rstrip("/")
        return [join_uri(base, rel) + "/" * rel.endswith("/") for rel in self._rels(loc, recursive)]

    def list_etags(self, uri_prefix: str) -> dict[str, str]:
        """Full URI -> a version tag of every file under a folder/prefix: the S3 ETag, or size and
        modification time for a local file (a rewritten object gets a new tag)."""
        loc = parse_uri(uri_prefix)
        base = uri_prefix.rstrip("/")
        if loc.kind == "s3":
            with self._errors(uri_prefix, loc.bucket):
                return {join_uri(base, rel): tag for rel, tag in sorted(self._s3.etags(loc).items())}
        out = {}
        for rel in self._rels(loc):
            if loc.kind == "local":
                st = (loc.path / rel).stat()
                out[join_uri(base, rel)] = f"{st.st_size}-{st.st_mtime_ns}"
            else:
                out[f"bundled://{rel}"] = "bundled"
        return out

    def open(self, uri: str, mode: str = "rb") -> IO[bytes]:
        """A binary stream: ``rb`` streams the object; ``wb`` makes it appear whole on a clean close."""
        loc = parse_uri(uri)
        if mode == "rb":
            with self._errors(uri, loc.bucket):
                if loc.kind == "bundled":
                    return gzip.open(loc.path, "rb")  # type: ignore[return-value]
                if loc.kind == "local":
                    return open(loc.path, "rb")
                return self._s3.open_reader(loc)
        if mode != "wb":
            raise ValueError(f"open({uri!r}): mode must be 'rb' or 'wb', got {mode!r}")
        loc.require_writable()
        if loc.kind == "s3":
            def upload(f: IO[bytes]) -> None:
                f.seek(0)
                with self._errors(uri, loc.bucket):
                    self._s3.put_stream(f, loc)

            spool = tempfile.SpooledTemporaryFile(max_size=8 * MIB, prefix="lm-upload-")  # noqa: SIM115
            return Writer(spool, upload, lambda: None)  # type: ignore[arg-type,return-value]
        with self._errors(uri):
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.tmp_sibling(loc.path)
            out = open(tmp, "wb")  # noqa: SIM115 (closed by Writer)

        def replace(f: IO[bytes]) -> None:
            f.close()
            with self._errors(uri):
                os.replace(tmp, loc.path)

        return Writer(out, replace, lambda: tmp.unlink(missing_ok=True))  # type: ignore[return-value]

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
        loc.require_writable()
        with self._errors(uri, loc.bucket):
            if loc.kind == "s3":
                return self._s3.create_if_absent(loc, data)
            return local.create_if_absent(loc.path, data)

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def open_text(self, uri: str) -> Iterator[str]:
        """Stream the lines (utf-8, line ending stripped) of a text object; ``*.gz`` is gunzipped on the fly."""
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
        d.require_writable()
        if s.kind == d.kind == "s3":
            with self._errors(f"{src} -> {dst}", s.bucket):
                self._s3.copy(s, d)
        elif s.kind == "local":
            if not s.path.is_file():
                raise StorageNotFound(f"{src}: no such file")
            self._put_file(s.path, dst)
        elif d.kind == "local":
            self._get_file(src, d.path)
        else:
            with self.open(src, "rb") as r, self.open(dst, "wb") as w:
                shutil.copyfileobj(r, w, MIB)

    def delete(self, uri: str) -> int:
        """Delete a file/object and everything under it as a folder/prefix; returns the number of files."""
        loc = parse_uri(uri)
        loc.require_writable()
        if loc.kind == "s3":
            keys = [loc.key_of(rel) for rel in self._rels(loc)]
            keys += [loc.key] if loc.key and self.exists(uri) else []
            self._delete_keys(loc, keys)
            return len(keys)
        with self._errors(uri):
            return local.delete_path(loc.path)

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Fetch a folder/prefix into ``local_dir``; a published one yields exactly its verified listing."""
        dest = Path(local_dir)
        listing = self.read_published_listing(uri) if self.is_published(uri) else None
        rels = [f["path"] for f in listing["files"]] if listing else self._rels(parse_uri(uri))
        _parallel(lambda rel: self._get_file(join_uri(uri, rel), dest / rel), rels)
        if listing:
            for f in listing["files"]:
                if local.sha256(dest / f["path"]) != f["sha256"]:
                    raise StorageError(f"{uri}: {f['path']} does not match {MARKER} (re-published meanwhile?)")
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
        return None if loc.kind == "s3" else loc.path

    def pyarrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """``(pyarrow.fs.FileSystem, path)`` for ``uri`` with this store's settings (e.g. for Ray Data)."""
        loc = parse_uri(uri)
        if loc.kind == "s3":
            return self._s3.pyarrow_filesystem(), f"{loc.bucket}/{loc.key}".rstrip("/")
        import pyarrow.fs as pafs

        return pafs.LocalFileSystem(), str(loc.path.absolute())

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
        loc.require_writable()
        if not src.is_dir():
            raise StorageNotFound(f"{src}: no such folder to publish")
        rels = [r for r in local.files(src) if r != MARKER]
        files = [{"path": r, "size": (src / r).stat().st_size, "sha256": local.sha256(src / r)} for r in rels]
        listing = {"format": "lmforge-published/1", "published_at": time.time(), "files": files}
        marker = json.dumps(listing, indent=2).encode()
        if loc.kind == "local":
            def fill(tmp: Path) -> None:
                self._put_files(src, rels, str(tmp))
                (tmp / MARKER).write_bytes(marker)

            with self._errors(uri):
                local.replace_dir(loc.path, fill)
            return listing
        marker_uri = join_uri(uri, MARKER)
        self.delete(marker_uri)  # from here on readers see "not published", never a mix
        self._put_files(src, rels, uri)
        self.write_bytes(marker_uri, marker)
        stale = set(self._rels(loc)) - set(rels) - {MARKER}
        self._delete_keys(loc, sorted(loc.key_of(rel) for rel in stale))
        return listing

    def is_published(self, uri: str) -> bool:
        """True if ``uri`` holds a complete ``publish_dir`` (its marker exists)."""
        return parse_uri(uri).kind != "bundled" and self.exists(join_uri(uri, MARKER))

    def read_published_listing(self, uri: str) -> dict[str, Any]:
        """The marker of a published folder: ``{"files": [{"path", "size", "sha256"}, ...], ...}``."""
        try:
            return json.loads(self.read_text(join_uri(uri, MARKER)))
        except StorageNotFound:
            raise StorageNotFound(f"{uri}: not published (no {MARKER})") from None
