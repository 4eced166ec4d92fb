"""S3 backend: the S3 settings (``StorageConfig`` fields, else the ``AWS_*`` env vars read at construction,
else boto3's chain), the lazily built, thread-safe boto3 client (dropped on pickling and rebuilt, so a store
can ship to Ray workers), the raw object operations, :class:`S3Backend` (the backend protocol over them, for
``s3://bucket/key`` URIs) and :meth:`S3.translate`, which turns boto errors into :class:`StorageError` /
:class:`StorageNotFound` messages naming the URI and the endpoint but never a secret. The methods here raise
boto errors; the store wraps them."""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import exceptions as bex
from botocore.config import Config as BotoConfig
from pydantic import SecretStr

from lm.config import StorageConfig
from lm.storage.backend import Staged
from lm.storage.errors import StorageError, StorageNotFound
from lm.storage.streams import MIB, BodyReader
from lm.storage.uri import Loc
from lm.uri import join_uri

BOTO_ERRORS = (bex.BotoCoreError, bex.ClientError, S3UploadFailedError)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket", "404", "NotFound"}
_UNREACHABLE = (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError)


def _reveal(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _code(err: bex.ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


class S3:
    """One store's S3 settings and client (secrets stay ``SecretStr`` until handed to boto3/pyarrow)."""

    def __init__(self, cfg: StorageConfig) -> None:
        env = os.environ.get
        self.cfg = cfg
        self.endpoint_url = cfg.endpoint_url or env("AWS_ENDPOINT_URL") or None
        self.region = cfg.region or env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"
        key, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        self._key = cfg.access_key_id or (SecretStr(key) if key else None)
        self._secret = cfg.secret_access_key or (SecretStr(secret) if secret else None)
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # picklable (Ray tasks): settings travel, the client is rebuilt
        return {k: v for k, v in self.__dict__.items() if k not in ("_client", "_lock")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _client=None, _lock=threading.Lock())

    def client(self) -> Any:
        """The boto3 S3 client (created on first use; thread-safe)."""
        with self._lock:
            if self._client is None:
                config = BotoConfig(
                    connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"},
                    max_pool_connections=32, s3={"addressing_style": "path"} if self.endpoint_url else None,
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required")
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config,
                    aws_access_key_id=_reveal(self._key), aws_secret_access_key=_reveal(self._secret))
            return self._client

    def endpoint(self) -> str:
        return self.endpoint_url or f"https://s3.{self.region}.amazonaws.com"

    def _transfer(self) -> TransferConfig:
        size = self.cfg.multipart_threshold_mb * MIB
        return TransferConfig(multipart_threshold=size, multipart_chunksize=size)

    # -------------------------------------------------------------------------------------- errors

    def translate(self, err: Exception, uri: str, bucket: str) -> StorageError:
        """The StorageError for a boto error raised while working on ``uri`` (in ``bucket``)."""
        if isinstance(err, S3UploadFailedError) and isinstance(err.__context__, bex.ClientError):
            err = err.__context__
        if isinstance(err, bex.ClientError):
            code, bucket = _code(err), err.response.get("Error", {}).get("BucketName") or bucket
            if code == "NoSuchBucket" or (code in _MISSING and bucket and not self._bucket_exists(bucket)):
                return StorageError(f"{uri}: bucket '{bucket}' does not exist at {self.endpoint()}")
            if code in _MISSING:
                return StorageNotFound(f"{uri}: no such object")
            if code in _DENIED or err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403:
                return StorageError(
                    f"{uri}: access denied by {self.endpoint()} ({code}); check AWS_ACCESS_KEY_ID/"
                    "AWS_SECRET_ACCESS_KEY (or storage.access_key_id / storage.secret_access_key)")
            return StorageError(f"{uri}: S3 error {code}: {err.response.get('Error', {}).get('Message', '')}")
        if isinstance(err, _UNREACHABLE):
            return StorageError(f"{uri}: cannot reach the S3 endpoint {self.endpoint()} ({err})")
        if isinstance(err, bex.NoCredentialsError):
            return StorageError(f"{uri}: no S3 credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
        return StorageError(f"{uri}: {type(err).__name__}: {err}")

    def _bucket_exists(self, bucket: str) -> bool:
        try:
            self.client().head_bucket(Bucket=bucket)
        except bex.ClientError as err:
            return _code(err) not in _NO_BUCKET
        except bex.BotoCoreError:
            return True  # cannot tell; the caller reports its own error
        return True

    # ---------------------------------------------------------------------------------- operations

    def exists(self, loc: Loc) -> bool:
        """True if an object is at ``loc``; a bucket URI (no key) only checks that the bucket is there."""
        if not loc.key:
            self.client().head_bucket(Bucket=loc.bucket)
            return False
        self.client().head_object(Bucket=loc.bucket, Key=loc.key)
        return True

    def has_object(self, loc: Loc) -> bool:
        """True if an object is at ``loc``, False if not (once its bucket is known to exist)."""
        try:
            return self.exists(loc)
        except bex.ClientError as err:
            if _code(err) in _MISSING:
                return False
            raise

    def rels(self, loc: Loc, recursive: bool) -> list[str]:
        """Keys under ``loc`` as a prefix, relative to it, sorted (non-recursive: sub-prefixes end in '/')."""
        prefix, out = f"{loc.key}/" if loc.key else "", []
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=loc.bucket, Prefix=prefix, **({} if recursive else {"Delimiter": "/"}))
        for page in pages:
            out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
            out += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", [])]
        return sorted(r for r in out if r)

    def etags(self, loc: Loc) -> dict[str, str]:
        """Key (relative to ``loc``) -> ETag of every object under ``loc`` as a prefix."""
        prefix, out = f"{loc.key}/" if loc.key else "", {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=loc.bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                out[o["Key"][len(prefix) :]] = str(o.get("ETag", "")).strip('"')
        return out

    def open_reader(self, loc: Loc) -> IO[bytes]:
        body = self.client().get_object(Bucket=loc.bucket, Key=loc.key)["Body"]
        return io.BufferedReader(BodyReader(body), buffer_size=MIB)  # type: ignore[return-value]

    def put_file(self, src: Path, loc: Loc) -> None:
        self.client().upload_file(str(src), loc.bucket, loc.key, Config=self._transfer())

    def put_stream(self, f: IO[bytes], loc: Loc) -> None:
        self.client().upload_fileobj(f, loc.bucket, loc.key, Config=self._transfer())

    def create_if_absent(self, loc: Loc, data: bytes) -> bool:
        """A conditional PUT (``If-None-Match: *``): False if an object is already at ``loc`` (412, or 409
        when another conditional write to the key is in flight)."""
        try:
            self.client().put_object(Bucket=loc.bucket, Key=loc.key, Body=data, IfNoneMatch="*")
        except bex.ClientError as err:
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if _code(err) in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise
        return True

    def get_file(self, loc: Loc, dst: Path) -> None:
        self.client().download_file(loc.bucket, loc.key, str(dst), Config=self._transfer())

    def copy(self, src: Loc, dst: Loc) -> None:
        """Server-side copy (multipart for big objects)."""
        source = {"Bucket": src.bucket, "Key": src.key}
        self.client().copy(source, dst.bucket, dst.key, Config=self._transfer())

    def delete_keys(self, loc: Loc, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            if errors := self.client().delete_objects(Bucket=loc.bucket, Delete=batch).get("Errors"):
                first = errors[0]
                raise StorageError(f"{loc.uri}: could not delete {first.get('Key')}: {first.get('Code')}")

    def create_bucket(self, name: str) -> None:
        """Create a bucket in this region; fine if this account already owns it."""
        location = {"LocationConstraint": self.region}
        where = {} if self.region == "us-east-1" else {"CreateBucketConfiguration": location}
        try:
            self.client().create_bucket(Bucket=name, **where)
        except bex.ClientError as err:
            if _code(err) != "BucketAlreadyOwnedByYou":
                raise

    def pyarrow_filesystem(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` with these settings."""
        import pyarrow.fs as pafs

        extra = {}
        if self.endpoint_url:
            parts = urlsplit(self.endpoint_url)
            extra = {"endpoint_override": parts.netloc, "scheme": parts.scheme or "https"}
        return pafs.S3FileSystem(
            access_key=_reveal(self._key), secret_key=_reveal(self._secret), region=self.region,
            connect_timeout=5, request_timeout=60,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2), **extra)


class S3Backend:
    """``s3://bucket/key`` URIs: the backend protocol over one store's :class:`S3` (settings and client)."""

    read_only = False

    def __init__(self, s3: S3) -> None:
        self.s3 = s3

    def require_writable(self, loc: Loc) -> None:
        pass

    def exists(self, loc: Loc) -> bool:
        return self.s3.exists(loc)

    def rels(self, loc: Loc, recursive: bool) -> list[str]:
        return self.s3.rels(loc, recursive)

    def child_uri(self, loc: Loc, rel: str) -> str:
        return join_uri(loc.uri, rel)

    def etags(self, loc: Loc) -> dict[str, str]:
        return self.s3.etags(loc)

    def open_read(self, loc: Loc) -> IO[bytes]:
        return self.s3.open_reader(loc)

    def open_write(self, loc: Loc) -> Staged:
        """A spooled temp file (in memory up to 8 MiB), uploaded in one PUT or multipart upload on commit."""
        spool = tempfile.SpooledTemporaryFile(max_size=8 * MIB, prefix="lm-upload-")  # noqa: SIM115

        def upload(f: IO[bytes]) -> None:
            f.seek(0)
            self.s3.put_stream(f, loc)

        return Staged(spool, upload, lambda: None)

    def put_file(self, src: Path, loc: Loc) -> None:
        self.s3.put_file(src, loc)

    def get_file(self, loc: Loc, dst: Path) -> None:
        self.s3.get_file(loc, dst)

    def create_if_absent(self, loc: Loc, data: bytes) -> bool:
        return self.s3.create_if_absent(loc, data)

    def server_copy(self, src: Loc, dst: Loc) -> bool:
        self.s3.copy(src, dst)
        return True

    def delete(self, loc: Loc) -> int:
        """Every object under ``loc`` as a prefix, and the one at ``loc`` itself."""
        keys = [loc.key_of(rel) for rel in self.s3.rels(loc, recursive=True)]
        keys += [loc.key] if loc.key and self.s3.has_object(loc) else []
        self.s3.delete_keys(loc, keys)
        return len(keys)

    def delete_files(self, loc: Loc, rels: list[str]) -> None:
        self.s3.delete_keys(loc, [loc.key_of(rel) for rel in rels])

    def swap_in_dir(self, loc: Loc, fill: Callable[[str], None]) -> bool:
        return False  # S3 has no rename: the store publishes with the marker written last

    def local_path(self, loc: Loc) -> Path | None:
        return None

    def plain_path(self, loc: Loc) -> Path | None:
        return None

    def pyarrow_filesystem(self, loc: Loc) -> tuple[Any, str]:
        return self.s3.pyarrow_filesystem(), f"{loc.bucket}/{loc.key}".rstrip("/")
