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

Modules: ``store`` (the facade: dispatch, error translation, parallel transfers, publishing), ``backend``
(the ``Backend`` protocol each URI kind implements), ``local`` (the local-folder backend and its helpers),
``s3`` (boto3 client, S3 operations, error translation, the S3 backend), ``bundled`` (the read-only corpora
backend), ``uri`` (URI parsing), ``streams`` (stream adapters), ``errors``.
"""

from lm.storage.errors import StorageError, StorageNotFound
from lm.storage.store import MARKER, ObjectStore

__all__ = ["MARKER", "ObjectStore", "StorageError", "StorageNotFound"]
