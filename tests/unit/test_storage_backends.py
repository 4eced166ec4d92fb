"""lm.storage's backend protocol: every URI kind (local, S3, bundled://) implements all of it, the store picks
one backend per parsed URI, and the read-only bundled:// backend refuses every write, naming the URI."""

from __future__ import annotations

import inspect
import re

import pytest

from lm.config import StorageConfig
from lm.storage import ObjectStore, StorageError
from lm.storage.backend import Backend
from lm.storage.bundled import BundledBackend
from lm.storage.local import LocalBackend
from lm.storage.s3 import S3, S3Backend
from lm.storage.uri import parse_uri

METHODS = sorted(name for name, value in vars(Backend).items()
                 if inspect.isfunction(value) and not name.startswith("_"))
BACKENDS = {"local": LocalBackend, "s3": S3Backend, "bundled": BundledBackend}
CORPUS = "bundled://tinyshakespeare"


def make(cls: type) -> object:
    return cls(S3(StorageConfig())) if cls is S3Backend else cls()


def test_the_protocol_covers_every_storage_operation():
    assert {"exists", "rels", "open_read", "open_write", "put_file", "get_file", "create_if_absent",
            "server_copy", "delete", "delete_files", "swap_in_dir", "pyarrow_filesystem"} <= set(METHODS)
    assert "read_only" in Backend.__annotations__


@pytest.mark.parametrize("cls", BACKENDS.values(), ids=BACKENDS.keys())
def test_every_backend_implements_every_method_of_the_protocol(cls):
    for name in METHODS:
        assert name in vars(cls), f"{cls.__name__} lacks {name}"
        want = list(inspect.signature(getattr(Backend, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, f"{cls.__name__}.{name}"
    assert isinstance(cls.read_only, bool)
    assert isinstance(make(cls), Backend)


URIS = [("some/dir/f.txt", "local"), ("file:///tmp/f.txt", "local"), ("s3://bucket/key", "s3"),
        (CORPUS, "bundled"), ("bundled://", "bundled")]


@pytest.mark.parametrize(("uri", "kind"), URIS)
def test_the_store_picks_one_backend_per_uri_kind(uri, kind):
    assert type(ObjectStore()._backend(parse_uri(uri))) is BACKENDS[kind]
    assert BACKENDS[kind].read_only == (kind == "bundled")


def test_every_write_to_bundled_raises_storage_error_naming_the_uri(tmp_path):
    loc, other, backend = parse_uri(CORPUS), parse_uri("bundled://copy"), BundledBackend()
    src = tmp_path / "f.txt"
    src.write_text("x")
    writes = {"require_writable": (loc,), "open_write": (loc,), "put_file": (src, loc),
              "create_if_absent": (loc, b"x"), "server_copy": (other, loc), "delete": (loc,),
              "delete_files": (loc, ["x"]), "swap_in_dir": (loc, lambda tmp: None)}
    for name, args in writes.items():
        with pytest.raises(StorageError, match=re.escape(CORPUS) + ".*read-only"):
            getattr(backend, name)(*args)
    store = ObjectStore()
    path = store.local_path(CORPUS)
    assert path is not None
    before = path.read_bytes()
    for write in (lambda: store.write_text(CORPUS, "x"), lambda: store.open(CORPUS, "wb"),
                  lambda: store.create_if_absent(CORPUS, b"x"), lambda: store.delete(CORPUS),
                  lambda: store.publish_file(src, CORPUS), lambda: store.publish_dir(tmp_path, CORPUS),
                  lambda: store.copy(str(src), CORPUS), lambda: store.copy(CORPUS, "bundled://copy")):
        with pytest.raises(StorageError, match=r"bundled://(tinyshakespeare|copy): .*read-only"):
            write()
    assert path.read_bytes() == before
    assert not store.is_published(CORPUS)
