"""Storage: one API over local folders, ``file://``, ``s3://bucket/prefix`` and ``bundled://NAME`` URIs.

Every byte lmforge reads or writes goes through :class:`ObjectStore`, so a stage runs unchanged on a
local folder or on S3 (AWS or any S3-compatible server such as SeaweedFS / MinIO):

    store = ObjectStore(cfg.storage)          # or ObjectStore(): S3 settings from the AWS_* env vars
    store.write_text(join_uri(root, "notes.txt"), "hello")
    for line in store.open_text("s3://bucket/corpus.txt.gz"): ...   # streamed, gunzipped on the fly
    store.publish_dir(local_dir, join_uri(root, "model"))            # atomic: all files or none
    fs, path = store.pyarrow_filesystem(uri)                         # for Ray Data / pyarrow

URIs: a path or ``file://PATH``; ``s3://bucket/key``; ``bundled://NAME`` (read-only) is the corpus
``lm/corpora/NAME.txt.gz`` shipped with the package and reads as its *decompressed* text
(``local_path``/``pyarrow_filesystem`` give the ``.gz`` file). ``exists`` asks about a file/object;
``list``/``delete``/``download_dir`` treat the URI as a folder (``s3://b/p`` covers ``p/...``, never ``p2``).
S3 settings: the ``StorageConfig`` fields, else ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (default us-east-1) read at construction, else boto3's chain.
Secrets stay ``SecretStr``: never in reprs, logs or error messages.

Publishing: every write (``write_*``, ``open(..., "wb")``, ``copy``, ``publish_file``) appears whole or
not at all (local: temp sibling + ``os.replace``; S3: one PUT / multipart upload). ``publish_dir``
writes all files, then ``<uri>/_PUBLISHED.json`` (paths, sizes, sha256) last; locally the folder is
swapped in by rename, on S3 a re-publish first deletes the old marker (the URI reads as unpublished
meanwhile), uploads, writes the new marker, then deletes stale keys. Readers check ``is_published``,
read ``read_published_listing`` and fetch only the listed files; ``download_dir`` does that and
verifies every sha256, so it never returns a mix.

Errors: :class:`StorageError`, naming the URI (missing bucket, access denied, unreachable endpoint,
read-only URI); a missing file/object raises :class:`StorageNotFound`, also a ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bex
from botocore.config import Config as BotoConfig
from pydantic import SecretStr

from lm.config import StorageConfig, join_uri

__all__ = ["MARKER", "ObjectStore", "StorageError", "StorageNotFound"]

MARKER = "_PUBLISHED.json"
_TMP = ".lmtmp-"  # prefix of in-flight temp siblings; list() hides them
_MIB = 1 << 20
_CORPORA = Path(__file__).parent / "corpora"
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)


class StorageError(Exception):
    """A storage operation failed; the message names the URI and what to check."""


class StorageNotFound(StorageError, FileNotFoundError):
    """No file or object at the URI."""


@dataclass(frozen=True)
class _Loc:
    uri: str
    kind: str  # "local" | "s3" | "bundled"
    path: Path = Path()
    bucket: str = ""
    key: str = ""


def _parse(uri: str | os.PathLike) -> _Loc:
    uri = os.fspath(uri)
    if uri.startswith("s3://"):
        bucket, _, key = uri[5:].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket name in the S3 URI")
        return _Loc(uri, "s3", bucket=bucket, key=key.strip("/"))
    if uri.startswith("bundled://"):
        name = uri[10:].strip("/")
        if name and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
            raise StorageError(f"{uri}: invalid bundled corpus name")
        return _Loc(uri, "bundled", path=_CORPORA / f"{name}.txt.gz" if name else _CORPORA)
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"{uri}: unsupported URI scheme (use a path, file://, s3:// or bundled://)")
    return _Loc(uri, "local", path=Path(uri.removeprefix("file://")).expanduser())


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _code(err: bex.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _local_files(root: Path) -> list[str]:
    """Relative posix paths of every file under ``root``, sorted, temp siblings skipped."""
    rels = (p.relative_to(root) for p in root.rglob("*") if p.is_file()) if root.is_dir() else ()
    return sorted(r.as_posix() for r in rels if not any(part.startswith(_TMP) for part in r.parts))


def _tmp_sibling(path: Path, tag: str = "") -> Path:
    return path.parent / f"{_TMP}{tag}{path.name}-{uuid.uuid4().hex[:10]}"


class _BodyReader(io.RawIOBase):
    """Raw readable stream over a botocore StreamingBody (read chunk by chunk, never whole)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._body.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _Writer(io.RawIOBase):
    """Write-only file: ``commit`` runs on a clean close; an error in the ``with`` block or GC discards."""

    def __init__(self, tmp: IO[bytes], commit: Callable[[IO[bytes]], None], discard: Callable[[], None]) -> None:
        super().__init__()
        self._tmp, self._commit, self._discard = tmp, commit, discard

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._tmp.write(data)

    def _finish(self, commit: bool) -> None:
        if not self.closed:
            try:
                self._commit(self._tmp) if commit else self._discard()
            finally:
                self._tmp.close()
                super().close()

    def close(self) -> None:
        self._finish(commit=True)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._finish(commit=exc_type is None)

    def __del__(self) -> None:  # an abandoned writer never publishes half a file
        with contextlib.suppress(Exception):
            self._finish(commit=False)


class ObjectStore:
    """Read, write, list, copy, delete and atomically publish files behind URIs (see the module doc)."""

    def __init__(self, cfg: StorageConfig | None = None) -> None:
        self.cfg = cfg or StorageConfig()
        env = os.environ.get
        self._endpoint_url = self.cfg.endpoint_url or env("AWS_ENDPOINT_URL") or None
        self._region = self.cfg.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"
        key, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        self._key = self.cfg.access_key_id or (SecretStr(key) if key else None)
        self._secret = self.cfg.secret_access_key or (SecretStr(secret) if secret else None)
        self._client: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ObjectStore(root={self.cfg.root!r}, endpoint={self._endpoint()!r})"

    def __getstate__(self) -> dict[str, Any]:  # picklable (Ray tasks): settings travel, the client is rebuilt
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _lock=threading.Lock())

    # ------------------------------------------------------------------------------------ plumbing

    def client(self) -> Any:
        """This store's boto3 S3 client (created on first use; thread-safe)."""
        with self._lock:
            if self._client is None:
                config = BotoConfig(
                    connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"},
                    max_pool_connections=32, s3={"addressing_style": "path"} if self._endpoint_url else None,
                    request_checksum_calculation="when_required", response_checksum_validation="when_required")
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self._endpoint_url, region_name=self._region, config=config,
                    aws_access_key_id=_reveal(self._key), aws_secret_access_key=_reveal(self._secret))
            return self._client

    def _endpoint(self) -> str:
        return self._endpoint_url or f"https://s3.{self._region}.amazonaws.com"

    def _transfer(self) -> TransferConfig:
        size = self.cfg.multipart_threshold_mb * _MIB
        return TransferConfig(multipart_threshold=size, multipart_chunksize=size)

    @contextlib.contextmanager
    def _errors(self, uri: str, bucket: str = "") -> Iterator[None]:
        """Turn boto/OS errors into StorageError / StorageNotFound naming ``uri`` (never a secret)."""
        try:
            yield
        except StorageError:
            raise
        except (bex.BotoCoreError, bex.ClientError, S3UploadFailedError) as err:
            raise self._translate(err, uri, bucket) from err
        except FileNotFoundError as err:
            raise StorageNotFound(f"{uri}: no such file or object") from err
        except OSError as err:
            raise StorageError(f"{uri}: {err.strerror or err}") from err

    def _translate(self, err: Exception, uri: str, bucket: str) -> StorageError:
        if isinstance(err, S3UploadFailedError) and isinstance(err.__context__, bex.ClientError):
            err = err.__context__
        if isinstance(err, bex.ClientError):
            code, bucket = _code(err), err.response.get("Error", {}).get("BucketName") or bucket
            if code == "NoSuchBucket" or (code in _MISSING and bucket and not self._bucket_exists(bucket)):
                return StorageError(f"{uri}: bucket '{bucket}' does not exist at {self._endpoint()}")
            if code in _MISSING:
                return StorageNotFound(f"{uri}: no such object")
            if code in _DENIED or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return StorageError(f"{uri}: access denied by {self._endpoint()} ({code}); check AWS_ACCESS_KEY_ID/"
                                    "AWS_SECRET_ACCESS_KEY (or storage.access_key_id / storage.secret_access_key)")
            return StorageError(f"{uri}: S3 error {code}: {err.response.get('Error', {}).get('Message', '')}")
        if isinstance(err, _UNREACHABLE):
            return StorageError(f"{uri}: cannot reach the S3 endpoint {self._endpoint()} ({err})")
        if isinstance(err, bex.NoCredentialsError):
            return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return StorageError(f"{uri}: {type(err).__name__}: {err}")

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            self.client().head_bucket(Bucket=bucket)
        except bex.ClientError as err:
            return _code(err) not in ("404", "NoSuchBucket", "NotFound")
        except bex.BotoCoreError:
            return True  # cannot tell; the caller reports its own error
        return True

    @staticmethod
    def _writable(loc: _Loc) -> None:
        if loc.kind == "bundled":
            raise StorageError(f"{loc.uri}: bundled:// corpora are read-only")

    @staticmethod
    def _parallel(fn: Callable[[Any], Any], items: Iterable[Any]) -> None:
        items = list(items)
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(items)))) as pool:
            list(pool.map(fn, items))

    def _rels(self, loc: _Loc, recursive: bool = True) -> list[str]:
        """Names under ``loc`` as a folder, relative to it, sorted (non-recursive: sub-folders end in '/')."""
        if loc.kind == "bundled":
            return sorted(p.name[:-7] for p in _CORPORA.glob("*.txt.gz")) if loc.path == _CORPORA else []
        if loc.kind == "local":
            if recursive:
                return _local_files(loc.path)
            kids = loc.path.iterdir() if loc.path.is_dir() else ()
            return sorted(p.name + "/" * p.is_dir() for p in kids if not p.name.startswith(_TMP))
        prefix, out = f"{loc.key}/" if loc.key else "", []
        with self._errors(loc.uri, loc.bucket):
            pages = self.client().get_paginator("list_objects_v2").paginate(
                Bucket=loc.bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"}))
            for page in pages:
                out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
                out += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", [])]
        return sorted(r for r in out if r)

    def _put_file(self, src: Path, uri: str) -> None:
        """Upload/copy one local file to ``uri``; it appears whole or not at all."""
        loc = _parse(uri)
        self._writable(loc)
        with self._errors(uri, loc.bucket):
            if loc.kind == "s3":
                return self.client().upload_file(str(src), loc.bucket, loc.key, Config=self._transfer())
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_sibling(loc.path)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, loc.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _get_file(self, uri: str, dst: Path) -> None:
        """Download/copy one object to the local file ``dst`` (atomically replaced)."""
        loc = _parse(uri)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp_sibling(dst)
        try:
            with self._errors(uri, loc.bucket):
                if loc.kind == "s3":
                    self.client().download_file(loc.bucket, loc.key, str(tmp), Config=self._transfer())
                else:
                    with self.open(uri, "rb") as src, open(tmp, "wb") as out:
                        shutil.copyfileobj(src, out, _MIB)
                os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)

    def _delete_keys(self, loc: _Loc, keys: list[str]) -> None:
        with self._errors(loc.uri, loc.bucket):
            for i in range(0, len(keys), 1000):
                batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
                if errors := self.client().delete_objects(Bucket=loc.bucket, Delete=batch).get("Errors"):
                    raise StorageError(f"{loc.uri}: could not delete {errors[0].get('Key')}: {errors[0].get('Code')}")

    # ------------------------------------------------------------------------------- public API

    def exists(self, uri: str) -> bool:
        """True if a file/object (not a folder/prefix) is at ``uri``; a missing bucket is a StorageError."""
        loc = _parse(uri)
        if loc.kind != "s3":
            return loc.path.is_file()
        try:
            with self._errors(uri, loc.bucket):
                if not loc.key:
                    self.client().head_bucket(Bucket=loc.bucket)
                    return False
                self.client().head_object(Bucket=loc.bucket, Key=loc.key)
                return True
        except StorageNotFound:
            return False

    def list(self, uri_prefix: str, recursive: bool = True) -> list[str]:
        """Full URIs of the files under a folder/prefix, sorted; non-recursive adds sub-folders ('…/')."""
        loc = _parse(uri_prefix)
        if loc.kind == "bundled":
            return [f"bundled://{rel}" for rel in self._rels(loc)]
        base = uri_prefix.rstrip("/")
        return [join_uri(base, rel) + "/" * rel.endswith("/") for rel in self._rels(loc, recursive)]

    def open(self, uri: str, mode: str = "rb") -> IO[bytes]:
        """A binary stream: ``rb`` streams the object; ``wb`` makes it appear whole on a clean close."""
        loc = _parse(uri)
        if mode == "rb":
            with self._errors(uri, loc.bucket):
                if loc.kind == "bundled":
                    return gzip.open(loc.path, "rb")  # type: ignore[return-value]
                if loc.kind == "local":
                    return open(loc.path, "rb")
                body = self.client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
                return io.BufferedReader(_BodyReader(body), buffer_size=_MIB)  # type: ignore[return-value]
        if mode != "wb":
            raise ValueError(f"open({uri!r}): mode must be 'rb' or 'wb', got {mode!r}")
        self._writable(loc)
        if loc.kind == "s3":
            def upload(f: IO[bytes]) -> None:
                f.seek(0)
                with self._errors(uri, loc.bucket):
                    self.client().upload_fileobj(f, loc.bucket, loc.key, Config=self._transfer())

            spool = tempfile.SpooledTemporaryFile(max_size=8 * _MIB, prefix="lm-upload-")  # noqa: SIM115
            return _Writer(spool, upload, lambda: None)  # type: ignore[arg-type,return-value]
        with self._errors(uri):
            loc.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _tmp_sibling(loc.path)
            local = open(tmp, "wb")  # noqa: SIM115 (closed by _Writer)

        def replace(f: IO[bytes]) -> None:
            f.close()
            with self._errors(uri):
                os.replace(tmp, loc.path)

        return _Writer(local, replace, lambda: tmp.unlink(missing_ok=True))  # type: ignore[return-value]

    def read_bytes(self, uri: str) -> bytes:
        with self.open(uri, "rb") as f, self._errors(uri):
            return f.read()

    def write_bytes(self, uri: str, data: bytes) -> None:
        with self.open(uri, "wb") as f:
            f.write(data)

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
        s, d = _parse(src), _parse(dst)
        self._writable(d)
        if s.kind == d.kind == "s3":
            with self._errors(f"{src} -> {dst}", s.bucket):
                self.client().copy({"Bucket": s.bucket, "Key": s.key}, d.bucket, d.key, Config=self._transfer())
        elif s.kind == "local":
            if not s.path.is_file():
                raise StorageNotFound(f"{src}: no such file")
            self._put_file(s.path, dst)
        elif d.kind == "local":
            self._get_file(src, d.path)
        else:
            with self.open(src, "rb") as r, self.open(dst, "wb") as w:
                shutil.copyfileobj(r, w, _MIB)

    def delete(self, uri: str) -> int:
        """Delete a file/object and everything under it as a folder/prefix; returns the number of files."""
        loc = _parse(uri)
        self._writable(loc)
        if loc.kind == "s3":
            keys = [f"{loc.key}/{rel}" if loc.key else rel for rel in self._rels(loc)]
            keys += [loc.key] if loc.key and self.exists(uri) else []
            self._delete_keys(loc, keys)
            return len(keys)
        with self._errors(uri):
            if loc.path.is_dir():
                count = len(_local_files(loc.path))
                shutil.rmtree(loc.path)
                return count
            if loc.path.is_file() or loc.path.is_symlink():
                loc.path.unlink()
                return 1
            return 0

    def download_dir(self, uri: str, local_dir: str | Path) -> Path:
        """Fetch a folder/prefix into ``local_dir``; a published one yields exactly its verified listing."""
        local = Path(local_dir)
        listing = self.read_published_listing(uri) if self.is_published(uri) else None
        rels = [f["path"] for f in listing["files"]] if listing else self._rels(_parse(uri))
        self._parallel(lambda rel: self._get_file(join_uri(uri, rel), local / rel), rels)
        if listing:
            for f in listing["files"]:
                if _sha256(local / f["path"]) != f["sha256"]:
                    raise StorageError(f"{uri}: {f['path']} does not match {MARKER} (re-published meanwhile?)")
            (local / MARKER).write_text(json.dumps(listing, indent=2))
        return local

    def upload_dir(self, local_dir: str | Path, uri: str) -> int:
        """Copy every file under ``local_dir`` to ``uri/<relative path>`` (no marker); returns the count."""
        src = Path(local_dir)
        rels = _local_files(src)
        self._parallel(lambda rel: self._put_file(src / rel, join_uri(uri, rel)), rels)
        return len(rels)

    def local_path(self, uri: str) -> Path | None:
        """The local Path behind a path/file:// or bundled:// URI (bundled: the .gz file); None for S3."""
        loc = _parse(uri)
        return None if loc.kind == "s3" else loc.path

    def pyarrow_filesystem(self, uri: str) -> tuple[Any, str]:
        """``(pyarrow.fs.FileSystem, path)`` for ``uri`` with this store's settings (e.g. for Ray Data)."""
        import pyarrow.fs as pafs

        loc = _parse(uri)
        if loc.kind != "s3":
            return pafs.LocalFileSystem(), str(loc.path.absolute())
        extra = {}
        if self._endpoint_url:
            parts = urlsplit(self._endpoint_url)
            extra = {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}
        fs = pafs.S3FileSystem(
            access_key=_reveal(self._key), secret_key=_reveal(self._secret), region=self._region,
            connect_timeout=5, request_timeout=60, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2),
            **extra)
        return fs, f"{loc.bucket}/{loc.key}".rstrip("/")

    def create_bucket(self, name: str) -> str:
        """Create an S3 bucket (fine if this account already owns it); returns ``s3://name``."""
        where = {} if self._region == "us-east-1" else {"LocationConstraint": self._region}
        with self._errors(f"s3://{name}", name):
            try:
                self.client().create_bucket(Bucket=name, **({"CreateBucketConfiguration": where} if where else {}))
            except bex.ClientError as err:
                if _code(err) != "BucketAlreadyOwnedByYou":
                    raise
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
        """Publish a local folder at ``uri`` atomically (see the module doc); returns the marker listing."""
        src, loc = Path(local_dir), _parse(uri)
        self._writable(loc)
        if not src.is_dir():
            raise StorageNotFound(f"{src}: no such folder to publish")
        rels = [r for r in _local_files(src) if r != MARKER]
        files = [{"path": r, "size": (src / r).stat().st_size, "sha256": _sha256(src / r)} for r in rels]
        listing = {"format": "lmforge-published/1", "published_at": time.time(), "files": files}
        marker = json.dumps(listing, indent=2).encode()
        if loc.kind == "local":
            self._publish_local(src, rels, marker, loc)
            return listing
        marker_uri = join_uri(uri, MARKER)
        self.delete(marker_uri)  # from here on readers see "not published", never a mix
        self._parallel(lambda rel: self._put_file(src / rel, join_uri(uri, rel)), rels)
        self.write_bytes(marker_uri, marker)
        stale = set(self._rels(loc)) - set(rels) - {MARKER}
        self._delete_keys(loc, sorted(f"{loc.key}/{r}" if loc.key else r for r in stale))
        return listing

    def _publish_local(self, src: Path, rels: list[str], marker: bytes, loc: _Loc) -> None:
        """Fill a temp sibling folder, then swap it in (old version moved aside, renamed, removed)."""
        target = loc.path
        tmp, old = _tmp_sibling(target), _tmp_sibling(target, "old-")
        with self._errors(loc.uri):
            try:
                tmp.mkdir(parents=True)
                self._parallel(lambda rel: self._put_file(src / rel, str(tmp / rel)), rels)
                (tmp / MARKER).write_bytes(marker)
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

    def is_published(self, uri: str) -> bool:
        """True if ``uri`` holds a complete ``publish_dir`` (its marker exists)."""
        return _parse(uri).kind != "bundled" and self.exists(join_uri(uri, MARKER))

    def read_published_listing(self, uri: str) -> dict[str, Any]:
        """The marker of a published folder: ``{"files": [{"path", "size", "sha256"}, ...], ...}``."""
        try:
            return json.loads(self.read_text(join_uri(uri, MARKER)))
        except StorageNotFound:
            raise StorageNotFound(f"{uri}: not published (no {MARKER})") from None
