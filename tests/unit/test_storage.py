"""lm.storage behaviour, on a local folder and on a real SeaweedFS S3 server (``store_root`` runs both)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import socket
import threading
import time
import tracemalloc
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lm.config import StorageConfig
from lm.storage import MARKER, ObjectStore, StorageError, StorageNotFound

MIB = 1 << 20


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def no_temp_leftovers(root: Path) -> bool:
    return not any(".lmtmp-" in p.name for p in root.rglob("*"))


# ------------------------------------------------------------------------------------- basic I/O


def test_bytes_and_text_round_trip(store_root):
    store, root = store_root.store, store_root.uri
    blob = bytes(range(256)) * 10
    store.write_bytes(f"{root}/bin/data.bin", blob)
    store.write_text(f"{root}/text/hello.txt", "héllo wörld ✓\nline 2")
    assert store.read_bytes(f"{root}/bin/data.bin") == blob
    assert store.read_text(f"{root}/text/hello.txt") == "héllo wörld ✓\nline 2"
    assert store.read_bytes(f"{root}/text/hello.txt") == "héllo wörld ✓\nline 2".encode()
    store.write_text(f"{root}/text/hello.txt", "replaced")
    assert store.read_text(f"{root}/text/hello.txt") == "replaced"
    assert store.exists(f"{root}/bin/data.bin")
    assert not store.exists(f"{root}/bin/nope.bin")
    assert not store.exists(f"{root}/bin")  # a folder/prefix is not a file
    with store.open(f"{root}/bin/data.bin") as f:
        assert f.read(3) == b"\x00\x01\x02" and f.read(2) == b"\x03\x04"


def test_list_nested_recursive_and_not(store_root):
    store, root = store_root.store, store_root.uri
    for rel in ("a.txt", "sub/b.txt", "sub/deep/c.txt", "zz.txt"):
        store.write_text(f"{root}/{rel}", rel)
    store.write_text(f"{root}-sibling/x.txt", "must not be listed")  # shares the string prefix
    assert store.list(root) == [f"{root}/a.txt", f"{root}/sub/b.txt", f"{root}/sub/deep/c.txt", f"{root}/zz.txt"]
    assert store.list(root + "/") == store.list(root)
    assert store.list(root, recursive=False) == [f"{root}/a.txt", f"{root}/sub/", f"{root}/zz.txt"]
    assert store.list(f"{root}/sub") == [f"{root}/sub/b.txt", f"{root}/sub/deep/c.txt"]
    assert store.list(f"{root}/missing") == []


def test_file_uris_keep_their_form(tmp_path):
    store = ObjectStore()
    uri = f"file://{tmp_path}/d"
    store.write_text(f"{uri}/x.txt", "x")
    assert (tmp_path / "d" / "x.txt").read_text() == "x"
    assert store.list(uri) == [f"{uri}/x.txt"]
    assert store.local_path(uri) == tmp_path / "d"


@pytest.mark.s3
def test_listing_more_than_1000_keys(s3_server):
    store = s3_server.store()
    root = f"s3://{s3_server.new_bucket()}/many"
    uris = [f"{root}/k{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda u: store.write_bytes(u, b"x"), uris))
    assert store.list(root) == uris  # sorted, complete across pages
    assert store.delete(root) == 1005
    assert store.list(root) == []


def test_open_wb_is_multipart_and_atomic(store_root):
    store = store_root.make_store(multipart_threshold_mb=5)
    uri = f"{store_root.uri}/big/blob.bin"
    digest = hashlib.sha256()
    with store.open(uri, "wb") as f:
        for _ in range(12):
            chunk = os.urandom(MIB)
            digest.update(chunk)
            f.write(chunk)
        assert not store.exists(uri)  # nothing visible before close
    assert store.exists(uri)
    assert sha(store.read_bytes(uri)) == digest.hexdigest()
    if store_root.kind == "s3":
        bucket, key = uri[5:].split("/", 1)
        etag = store.client().head_object(Bucket=bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-3"), etag  # 12 MiB in 5 MiB parts
    else:
        assert no_temp_leftovers(Path(store_root.uri))


def test_failed_write_leaves_old_content(store_root):
    store, uri = store_root.store, f"{store_root.uri}/obj.txt"
    store.write_text(uri, "old")
    with pytest.raises(RuntimeError), store.open(uri, "wb") as f:
        f.write(b"half written")
        raise RuntimeError("boom")
    assert store.read_text(uri) == "old"
    with pytest.raises(ValueError, match="mode"):
        store.open(uri, "r+")


def test_gz_text_streams_line_by_line(store_root, tmp_path):
    store, root = store_root.store, store_root.uri
    lines = [f"{i:08d} " + "the quick brown fox " * 3 for i in range(200_000)]  # ~14 MB of text
    local = tmp_path / "corpus.txt.gz"
    with gzip.open(local, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    uri = f"{root}/corpus.txt.gz"
    store.publish_file(local, uri)
    tracemalloc.start()
    try:
        it = store.open_text(uri)
        assert next(it) == lines[0]
        count = 1
        for i, line in enumerate(it, start=1):
            if i % 50_000 == 0:
                assert line == lines[i]
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == len(lines)
    assert peak < 4 * MIB, f"open_text held {peak / MIB:.1f} MiB: not streaming"
    store.write_text(f"{root}/plain.txt", "a\nb\r\nc")
    assert list(store.open_text(f"{root}/plain.txt")) == ["a", "b", "c"]


# ------------------------------------------------------------------------------------ copy/delete


def test_copy_in_and_out_and_within(store_root, tmp_path):
    store, root = store_root.store, store_root.uri
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    store.copy(str(src), f"{root}/in/a.bin")  # local -> backend
    store.copy(f"{root}/in/a.bin", f"{root}/other/b.bin")  # within the backend (S3: server side)
    store.copy(f"{root}/other/b.bin", str(tmp_path / "out" / "c.bin"))  # backend -> local
    assert (tmp_path / "out" / "c.bin").read_bytes() == src.read_bytes()
    assert store.read_bytes(f"{root}/other/b.bin") == src.read_bytes()
    store.copy("bundled://tinyshakespeare", f"{root}/ts.txt")
    assert store.read_text(f"{root}/ts.txt").startswith("First Citizen:")
    with pytest.raises(FileNotFoundError, match=r"missing\.bin"):
        store.copy(f"{root}/missing.bin", f"{root}/x.bin")


@pytest.mark.s3
def test_copy_between_buckets(s3_server):
    store = s3_server.store()
    a, b = s3_server.new_bucket(), s3_server.new_bucket()
    store.write_bytes(f"s3://{a}/x/y.bin", b"payload")
    store.copy(f"s3://{a}/x/y.bin", f"s3://{b}/z.bin")
    assert store.read_bytes(f"s3://{b}/z.bin") == b"payload"


def test_delete_file_and_prefix(store_root):
    store, root = store_root.store, store_root.uri
    for rel in ("a/1", "a/b/2", "ab/3"):
        store.write_text(f"{root}/{rel}", rel)
    assert store.delete(f"{root}/a") == 2
    assert store.list(root) == [f"{root}/ab/3"]  # the sibling sharing the prefix string survives
    assert store.delete(f"{root}/ab/3") == 1
    assert store.list(root) == []
    assert store.delete(f"{root}/nothing") == 0


def test_upload_and_download_dir(store_root, tmp_path):
    store, root = store_root.store, store_root.uri
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("A")
    (src / "sub" / "b.bin").write_bytes(b"\x00B")
    assert store.upload_dir(src, f"{root}/dir") == 2
    assert store.list(f"{root}/dir") == [f"{root}/dir/a.txt", f"{root}/dir/sub/b.bin"]
    out = store.download_dir(f"{root}/dir", tmp_path / "out")
    assert (out / "a.txt").read_text() == "A" and (out / "sub" / "b.bin").read_bytes() == b"\x00B"
    assert not store.is_published(f"{root}/dir")


# ------------------------------------------------------------------------------------- publishing


def make_dir(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


def test_publish_dir_and_republish(store_root, tmp_path):
    store, uri = store_root.store, f"{store_root.uri}/model"
    v1 = {"a.txt": b"one", "sub/b.bin": b"\x01" * 1000}
    v2 = {"a.txt": b"two!", "c.txt": b"new"}
    assert not store.is_published(uri)
    listing = store.publish_dir(make_dir(tmp_path / "v1", v1), uri)
    assert store.is_published(uri)
    marker = store.read_published_listing(uri)
    assert marker == json.loads(json.dumps(listing))
    assert [(f["path"], f["size"], f["sha256"]) for f in marker["files"]] == [
        (rel, len(data), sha(data)) for rel, data in sorted(v1.items())
    ]
    out = store.download_dir(uri, tmp_path / "dl1")
    assert {rel: (out / rel).read_bytes() for rel in v1} == v1 and (out / MARKER).is_file()

    store.publish_dir(make_dir(tmp_path / "v2", v2), uri)
    assert store.list(uri) == [f"{uri}/{MARKER}", f"{uri}/a.txt", f"{uri}/c.txt"]  # stale sub/b.bin gone
    assert store.read_bytes(f"{uri}/a.txt") == b"two!"
    assert [f["path"] for f in store.read_published_listing(uri)["files"]] == ["a.txt", "c.txt"]
    if store_root.kind == "local":
        assert json.loads((Path(uri) / MARKER).read_text())["files"][1]["sha256"] == sha(b"new")
        assert no_temp_leftovers(Path(store_root.uri))


def test_failed_republish_never_shows_a_mix(store_root, tmp_path, monkeypatch):
    store, uri = store_root.store, f"{store_root.uri}/model"
    v1 = {"a.txt": b"one", "b.txt": b"bee", "c.txt": b"sea"}
    store.publish_dir(make_dir(tmp_path / "v1", v1), uri)
    calls, lock, real_put = [0], threading.Lock(), store._put_file

    def flaky_put(src, dst):
        with lock:
            calls[0] += 1
            fail = calls[0] >= 2
        if fail:
            raise StorageError(f"{dst}: injected failure")
        real_put(src, dst)

    monkeypatch.setattr(store, "_put_file", flaky_put)
    with pytest.raises(StorageError, match="injected"):
        store.publish_dir(make_dir(tmp_path / "v2", {k: v.upper() for k, v in v1.items()}), uri)
    monkeypatch.undo()
    assert calls[0] >= 2
    if store.is_published(uri):  # whatever is published must be exactly what its marker lists
        out = store.download_dir(uri, tmp_path / "dl")  # verifies every sha256
        assert {rel: (out / rel).read_bytes() for rel in v1} == v1
    if store_root.kind == "local":  # the folder swap keeps the old version intact
        assert store.is_published(uri) and no_temp_leftovers(Path(store_root.uri))


def test_download_dir_rejects_files_not_matching_marker(store_root, tmp_path):
    store, uri = store_root.store, f"{store_root.uri}/pub"
    store.publish_dir(make_dir(tmp_path / "v1", {"a.txt": b"good"}), uri)
    store.write_bytes(f"{uri}/a.txt", b"tampered")
    with pytest.raises(StorageError, match=r"a\.txt does not match"):
        store.download_dir(uri, tmp_path / "dl")


def test_publish_file_replaces_whole(store_root, tmp_path):
    store, uri = store_root.store, f"{store_root.uri}/tok/tokenizer.json"
    store.publish_file(b'{"v": 1}', uri)
    assert store.read_bytes(uri) == b'{"v": 1}'
    src = tmp_path / "t.json"
    src.write_bytes(b'{"v": 2}' * 1000)
    store.publish_file(src, uri)
    assert store.read_bytes(uri) == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        store.publish_file(tmp_path / "missing.json", uri)
    assert store.read_bytes(uri) == src.read_bytes()
    assert not store.is_published(f"{store_root.uri}/tok")
    if store_root.kind == "local":
        assert no_temp_leftovers(Path(store_root.uri))


# ---------------------------------------------------------------------------------- bundled/pyarrow


def test_bundled_corpus_is_readable_and_read_only():
    store = ObjectStore()
    uri = "bundled://tinyshakespeare"
    assert store.exists(uri) and uri in store.list("bundled://")
    assert next(store.open_text(uri)) == "First Citizen:"
    assert store.read_bytes(uri).startswith(b"First Citizen:")
    path = store.local_path(uri)
    assert path is not None and path.name == "tinyshakespeare.txt.gz" and path.is_file()
    for write in (lambda: store.write_text(uri, "x"), lambda: store.open(uri, "wb"), lambda: store.delete(uri),
                  lambda: store.publish_file(b"x", uri), lambda: store.copy(uri, "bundled://copy")):
        with pytest.raises(StorageError, match="read-only"):
            write()
    assert store.read_bytes(uri).startswith(b"First Citizen:")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("bundled://no-such-corpus")
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        store.read_bytes("gs://bucket/x")


def test_pyarrow_filesystem_reads_same_bytes(store_root):
    store, uri = store_root.store, f"{store_root.uri}/pa/data.bin"
    data = os.urandom(50_000)
    store.write_bytes(uri, data)
    fs, path = store.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as f:
        assert f.read() == data
    folder_fs, folder = store.pyarrow_filesystem(f"{store_root.uri}/pa")
    assert folder_fs.get_file_info(folder).type.name == "Directory"
    if store_root.kind == "s3":
        assert type(fs).__name__ == "S3FileSystem" and path == uri[5:]


# ------------------------------------------------------------------------------------------ errors


def test_missing_object_is_file_not_found(store_root):
    store, uri = store_root.store, f"{store_root.uri}/no/such/key.txt"
    for op in (store.read_bytes, store.read_text, store.open, store.open_text, store.read_published_listing):
        with pytest.raises(FileNotFoundError) as info:
            op(uri)
        assert isinstance(info.value, StorageNotFound) and "no/such/key.txt" in str(info.value)


@pytest.mark.s3
def test_missing_bucket_is_named(s3_server):
    store = s3_server.store()
    bucket = f"missing-{uuid.uuid4().hex[:10]}"
    uri = f"s3://{bucket}/x/y.txt"
    for op in (store.read_bytes, store.exists, store.list, lambda u: store.write_text(u, "x")):
        with pytest.raises(StorageError, match=f"bucket '{bucket}' does not exist") as info:
            op(uri)
        assert uri in str(info.value) or f"s3://{bucket}/x" in str(info.value)
        assert not isinstance(info.value, FileNotFoundError)


@pytest.mark.s3
@pytest.mark.parametrize("bad", ["secret", "key"])
def test_wrong_credentials_are_access_denied_without_leaking(s3_server, bad):
    bucket = s3_server.new_bucket()
    s3_server.store().write_text(f"s3://{bucket}/ok.txt", "x")
    wrong_secret = f"wrong-secret-{uuid.uuid4().hex}"
    if bad == "secret":
        store = s3_server.store(secret_access_key=wrong_secret)
    else:
        store = s3_server.store(access_key_id=f"NOSUCHKEY{uuid.uuid4().hex[:8]}")
    uri = f"s3://{bucket}/ok.txt"
    for op in (store.read_bytes, store.exists, store.list, lambda u: store.write_text(u, "y")):
        with pytest.raises(StorageError, match="access denied") as info:
            op(uri)
        text = f"{info.value} {info.value!r}"
        assert "AWS_SECRET_ACCESS_KEY" in text and f"s3://{bucket}" in text
        assert wrong_secret not in text and s3_server.secret_key not in text
    assert wrong_secret not in repr(store) and s3_server.secret_key not in repr(s3_server.store())


def test_unreachable_endpoint_fails_fast_and_names_it():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    secret = f"secret-{uuid.uuid4().hex}"
    endpoint = f"http://127.0.0.1:{port}"
    store = ObjectStore(StorageConfig(endpoint_url=endpoint, access_key_id="k", secret_access_key=secret))
    start = time.monotonic()
    with pytest.raises(StorageError) as info:
        store.read_bytes("s3://some-bucket/key.txt")
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert endpoint in message and "s3://some-bucket/key.txt" in message and secret not in message


@pytest.mark.s3
def test_env_var_configuration(s3_server, monkeypatch):
    bucket = s3_server.new_bucket()
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store = ObjectStore()
    store.write_text(f"s3://{bucket}/env.txt", "from env")
    assert store.read_text(f"s3://{bucket}/env.txt") == "from env"
    fs, path = store.pyarrow_filesystem(f"s3://{bucket}/env.txt")
    assert fs.open_input_stream(path).read() == b"from env"
    # config fields win over the environment
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-from-env")
    with pytest.raises(StorageError, match="access denied"):
        ObjectStore().read_text(f"s3://{bucket}/env.txt")
    assert s3_server.store().read_text(f"s3://{bucket}/env.txt") == "from env"
    # a pickled store (e.g. shipped to a Ray worker) keeps its settings, not the worker's env
    clone = pickle.loads(pickle.dumps(s3_server.store()))
    assert clone.read_text(f"s3://{bucket}/env.txt") == "from env"


def test_list_etags_changes_when_an_object_is_rewritten(store_root):
    from lm.config import join_uri

    store, base = store_root.store, join_uri(store_root.uri, "inbox")
    store.write_bytes(join_uri(base, "a.txt"), b"one")
    store.write_bytes(join_uri(base, "sub/b.txt"), b"two")
    first = store.list_etags(base)
    assert sorted(first) == [join_uri(base, "a.txt"), join_uri(base, "sub/b.txt")] and all(first.values())
    time.sleep(0.01)
    store.write_bytes(join_uri(base, "a.txt"), b"one, rewritten")
    second = store.list_etags(base)
    assert second[join_uri(base, "a.txt")] != first[join_uri(base, "a.txt")]
    assert second[join_uri(base, "sub/b.txt")] == first[join_uri(base, "sub/b.txt")]
