"""lm.data.sources: planning file tasks from sources and reading them into document rows, robustly."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from lm.config import CleanConfig, DataConfig, SourceConfig, join_uri
from lm.data.sources import DOCUMENT_REASONS, OBJECT_REASONS, DataError, plan_files, read_file_task
from lm.storage import ObjectStore, StorageError


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _data(*sources: tuple[str, str], **source_fields) -> DataConfig:
    return DataConfig(sources=[SourceConfig(name=n, uri=u, **source_fields) for n, u in sources])


def _read(store: ObjectStore, task: dict, policy: str = "replace", max_bytes: int = 1 << 30, **kw) -> list[dict]:
    return list(read_file_task(task, filesystem_factory=store.pyarrow_filesystem,
                               clean=CleanConfig(invalid_utf8=policy), max_file_bytes=max_bytes, **kw))


def _read_source(store: ObjectStore, uri: str, policy: str = "replace", **source_fields) -> list[dict]:
    tasks = plan_files(store, _data(("s", uri), **source_fields))
    return [row for task in tasks for row in _read(store, task, policy)]


def _put(store: ObjectStore, root: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        store.write_bytes(join_uri(root, name), data)


# --------------------------------------------------------------------------------------- formats


def test_every_format_and_compression(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "corpus")
    jsonl = b'{"text": "j1"}\n\n{"text": "j2", "x": 1}\n'
    _put(store, root, {
        "a.txt": "one\n\ntwo é\n\n".encode(),
        "b.txt.gz": gzip.compress(b"three\n\nfour"),
        "c.txt.zst": zstandard.ZstdCompressor().compress(b"five\n\nsix"),
        "d.jsonl": jsonl,
        "e.jsonl.gz": gzip.compress(jsonl),
        "f.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl),
        "g.parquet": _parquet(pa.table({"text": ["p1", "p2"], "n": [1, 2]})),
    })
    tasks = plan_files(store, _data(("s", root)))
    got = {t["name"]: (t["format"], t["compression"]) for t in tasks}
    assert got == {"a.txt": ("txt", ""), "b.txt.gz": ("txt", "gzip"), "c.txt.zst": ("txt", "zstd"),
                   "d.jsonl": ("jsonl", ""), "e.jsonl.gz": ("jsonl", "gzip"), "f.jsonl.zst": ("jsonl", "zstd"),
                   "g.parquet": ("parquet", "")}
    assert [t["uri"] for t in tasks] == sorted(t["uri"] for t in tasks)
    rows = [row for task in tasks for row in _read(store, task)]
    assert all(r["reason"] == "" and r["source"] == "s" for r in rows)
    assert {r["id"]: r["text"] for r in rows} == {
        "s/a.txt#0": "one", "s/a.txt#1": "two é", "s/b.txt.gz#0": "three", "s/b.txt.gz#1": "four",
        "s/c.txt.zst#0": "five", "s/c.txt.zst#1": "six", "s/d.jsonl#0": "j1", "s/d.jsonl#2": "j2",
        "s/e.jsonl.gz#0": "j1", "s/e.jsonl.gz#2": "j2", "s/f.jsonl.zst#0": "j1", "s/f.jsonl.zst#2": "j2",
        "s/g.parquet#0": "p1", "s/g.parquet#1": "p2"}
    assert all(pickle.loads(pickle.dumps(t)) == t for t in tasks)  # tasks travel to Ray workers


def test_multi_frame_zstd_and_multi_member_gzip(tmp_path):
    store = ObjectStore()
    z = zstandard.ZstdCompressor()
    _put(store, str(tmp_path), {"a.txt.zst": z.compress(b"one\n\nt") + z.compress(b"wo"),
                                "b.txt.gz": gzip.compress(b"three\n") + gzip.compress(b"\nfour")})
    rows = _read_source(store, str(tmp_path))
    assert [r["text"] for r in rows] == ["one", "two", "three", "four"]


def test_txt_without_delimiter_and_declared_format(tmp_path):
    store = ObjectStore()
    _put(store, str(tmp_path), {"a.data": b"x\n\ny", "b.log": b'{"body": "z"}\n'})
    assert [r["text"] for r in _read_source(store, f"{tmp_path}/a.data", delimiter=None)] == ["x\n\ny"]
    rows = _read_source(store, f"{tmp_path}/b.log", format="jsonl", text_field="body")
    assert [(r["id"], r["text"]) for r in rows] == [("s/b.log#0", "z")]


@pytest.mark.parametrize("delimiter", ["\n\n", "<doc>", "¶¶"])
def test_delimiter_and_multibyte_chars_straddling_chunk_boundaries(tmp_path, delimiter):
    store = ObjectStore()
    docs = ["héllo wörld", "€uro 😀 emoji", "ascii", "ñ" * 7, "日本語のテキスト"]
    (tmp_path / "a.txt").write_bytes(delimiter.join(docs).encode())
    task = plan_files(store, _data(("s", str(tmp_path / "a.txt")), delimiter=delimiter))[0]
    for chunk_size in range(1, 12):  # every boundary falls inside some character and some delimiter
        rows = _read(store, task, "drop", chunk_size=chunk_size)
        assert [r["text"] for r in rows] == docs, chunk_size
        assert [r["id"] for r in rows] == [f"s/a.txt#{i}" for i in range(len(docs))]


def test_ten_mb_single_line_is_one_document_in_linear_time(tmp_path):
    store = ObjectStore()
    line = ("abcdefghé" * 1_100_000).encode()[:10_000_000]
    (tmp_path / "big.txt").write_bytes(line)
    (tmp_path / "big.jsonl").write_bytes(json.dumps({"text": line.decode()}).encode())
    for name, chunk_size in (("big.txt", 64 << 10), ("big.txt", 1 << 20), ("big.jsonl", 64 << 10)):
        task = plan_files(store, _data(("s", str(tmp_path / name))))[0]
        start = time.perf_counter()
        rows = _read(store, task, chunk_size=chunk_size)
        assert len(rows) == 1 and rows[0]["reason"] == "" and len(rows[0]["text"]) == len(line.decode())
        assert time.perf_counter() - start < 5


def test_bundled_corpus():
    store = ObjectStore()
    [task] = plan_files(store, _data(("ts", "bundled://tinyshakespeare")))
    assert (task["format"], task["compression"], task["name"]) == ("txt", "gzip", "tinyshakespeare")
    assert task["size"] > 0
    first = next(iter(read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=CleanConfig(),
                                     max_file_bytes=1 << 30)))
    assert first["id"] == "ts/tinyshakespeare#0" and first["text"].startswith("First Citizen:")


# ---------------------------------------------------------------------------------- expansion, ids


def test_ids_do_not_depend_on_the_storage_root(store_root):
    store = store_root.store
    files = {"a.txt": b"x\n\ny", "sub/b.jsonl": b'{"text": "z"}\n'}
    ids = []
    for root in (join_uri(store_root.uri, "one"), join_uri(store_root.uri, "two/deeper/corpus")):
        _put(store, root, files)
        rows = _read_source(store, root) + _read_source(store, f"{root}/sub/*.jsonl")
        ids.append([r["id"] for r in rows])
    assert ids[0] == ids[1] == ["s/a.txt#0", "s/a.txt#1", "s/sub/b.jsonl#0", "s/b.jsonl#0"]


def test_file_folder_and_glob_expansion_skip_hidden_files(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "c")
    _put(store, root, {name: b"x" for name in [
        "a.txt", "b.jsonl", "sub/c.txt", "sub/deep/d.txt", ".hidden.txt", "_PUBLISHED.json", "_tmp/e.txt",
        "sub/.git/f.txt", "x1.txt", "x2.txt"]})

    def names(uri: str) -> list[str]:
        return [t["name"] for t in plan_files(store, _data(("s", uri)))]

    assert names(root) == ["a.txt", "b.jsonl", "sub/c.txt", "sub/deep/d.txt", "x1.txt", "x2.txt"]
    assert names(root + "/") == names(root)
    assert names(f"{root}/sub/c.txt") == ["c.txt"]
    assert plan_files(store, _data(("s", f"{root}/sub/c.txt")))[0]["size"] == 1
    assert names(f"{root}/*.txt") == ["a.txt", "x1.txt", "x2.txt"]  # * stays inside one folder
    assert names(f"{root}/**/*.txt") == ["a.txt", "sub/c.txt", "sub/deep/d.txt", "x1.txt", "x2.txt"]
    assert names(f"{root}/x?.txt") == ["x1.txt", "x2.txt"]
    assert names(f"{root}/x[!1].txt") == ["x2.txt"]
    assert names(f"{root}/s*/c.txt") == ["sub/c.txt"]
    tasks = plan_files(store, _data(("s", root)))
    sizes = {t["size"] for t in tasks}
    assert sizes == {1}
    # several sources keep config order; every task is read with its own source's settings
    two = plan_files(store, _data(("z", f"{root}/x1.txt"), ("a", f"{root}/a.txt")))
    assert [t["source"] for t in two] == ["z", "a"]


def test_source_matching_nothing_is_a_data_error(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "c")
    _put(store, root, {"_PUBLISHED.json": b"{}", "a.txt": b"x"})
    for uri in (f"{root}/nothing", f"{root}/*.csv", f"{root}/_PUBLISHED.json/x"):
        with pytest.raises(DataError, match=r"'web'.*matches no files") as err:
            plan_files(store, _data(("web", uri)))
        assert uri in str(err.value)
    with pytest.raises(DataError, match="hidden"):
        plan_files(store, _data(("web", f"{root}/_*")))
    assert isinstance(DataError("x"), ValueError)


@pytest.mark.s3
def test_missing_bucket_and_bad_credentials_are_storage_errors(s3_server):
    store = s3_server.store()
    for uri in ("s3://no-such-bucket-lmforge/corpus/*.txt", "s3://no-such-bucket-lmforge/corpus"):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-lmforge' does not exist") as err:
            plan_files(store, _data(("web", uri)))
        assert "s3://no-such-bucket-lmforge/corpus" in str(err.value) and not isinstance(err.value, DataError)
    bucket = s3_server.new_bucket()
    bad = s3_server.store(secret_access_key="wrong-secret-value-123")
    with pytest.raises(StorageError, match=f"s3://{bucket}/corpus") as err:
        plan_files(bad, _data(("web", f"s3://{bucket}/corpus")))
    assert "wrong-secret-value-123" not in str(err.value) and s3_server.secret_key not in str(err.value)


# ---------------------------------------------------------------------------------------- bad input


def _one(rows: list[dict]) -> dict:
    assert len(rows) == 1, rows
    return rows[0]


BAD_OBJECTS = {
    "trunc.txt.gz": (gzip.compress(b"hello world " * 1000)[:-30], "corrupt_compression"),
    "notgzip.txt.gz": (b"this is not gzip at all", "corrupt_compression"),
    "bad.txt.zst": (b"(\xb5/\xfd garbage garbage garbage", "corrupt_compression"),
    "trunc.txt.zst": (zstandard.ZstdCompressor().compress(bytes(range(256)) * 400)[:-20], "corrupt_compression"),
    "nul.txt": (b"text\x00\x01\x02 more", "binary"),
    "utf16.txt": ("hello".encode("utf-16"), "binary"),
    "zero.txt": (b"", "empty"),
    "zero.txt.gz": (b"", "empty"),
    "blank.txt": (b" \n\n \t\n\n\n", "empty"),
    "blank.jsonl": (b"\n \n", "empty"),
    "blank.txt.gz": (gzip.compress(b"   \n\n"), "empty"),
    "allbad.jsonl": (b"not json\n{oops\n", "bad_json"),
    "notparquet.parquet": (b"PAR1 not really", "unreadable"),
    "nocol.parquet": (_parquet(pa.table({"body": ["x"]})), "missing_column"),
    "intcol.parquet": (_parquet(pa.table({"text": [1, 2]})), "missing_column"),
    "norows.parquet": (_parquet(pa.table({"text": pa.array([], pa.string())})), "empty"),
}


def test_every_bad_object_yields_one_row_with_its_reason(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "bad")
    _put(store, root, {name: data for name, (data, _) in BAD_OBJECTS.items()})
    tasks = plan_files(store, _data(("s", root)))
    assert len(tasks) == len(BAD_OBJECTS)
    for task in tasks:
        row = _one(_read(store, task))
        assert row["reason"] == BAD_OBJECTS[task["name"]][1], (task["name"], row)
        assert row["text"] == "" and row["detail"] and row["id"] == f"s/{task['name']}"
        assert row["reason"] in OBJECT_REASONS
    assert OBJECT_REASONS.isdisjoint(DOCUMENT_REASONS)


def test_corruption_after_good_documents_keeps_them(tmp_path):
    store = ObjectStore()
    blob = gzip.compress(b"".join(f"doc {i}\n\n".encode() for i in range(20_000)))
    (tmp_path / "a.txt.gz").write_bytes(blob[: len(blob) // 2])
    rows = _read(store, plan_files(store, _data(("s", str(tmp_path))))[0], chunk_size=4096)
    assert rows[-1]["reason"] == "corrupt_compression" and rows[-1]["id"] == "s/a.txt.gz"
    assert len(rows) > 100 and all(r["reason"] == "" for r in rows[:-1])
    assert [r["text"] for r in rows[:3]] == ["doc 0", "doc 1", "doc 2"]


def test_too_large_is_decided_before_reading(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "big")
    _put(store, root, {"a.txt": b"x" * 1000})
    task = plan_files(store, _data(("s", root)))[0]
    for size in (task["size"], -1):  # known from the listing, or asked for by the worker
        row = _one(_read(store, {**task, "size": size}, max_bytes=999))
        assert row["reason"] == "too_large" and "1000" in row["detail"]
    assert _read(store, task, max_bytes=1000)[0]["text"] == "x" * 1000


@pytest.mark.parametrize("policy", ["replace", "drop"])
def test_invalid_utf8_documents_follow_the_policy(tmp_path, policy):
    store = ObjectStore()
    (tmp_path / "a.txt").write_bytes(b"good\n\nbad \xff\xfe byte\n\nalso good " + "é".encode() * 2000)
    lines = [b'{"text": "fine"}', b'{"text": "bad \xff"}', b'{"text": "lone \\ud800 surrogate"}']
    (tmp_path / "b.jsonl").write_bytes(b"\n".join(lines))
    (tmp_path / "c.parquet").write_bytes(_parquet(pa.table({"text": pa.array([b"ok", b"\xff\xfe"], pa.binary())})))
    rows = {r["id"]: r for r in _read_source(store, str(tmp_path), policy)}
    bad_ids = ["s/a.txt#1", "s/b.jsonl#1", "s/b.jsonl#2", "s/c.parquet#1"]
    assert [rows[i]["text"] for i in ("s/a.txt#0", "s/b.jsonl#0", "s/c.parquet#0")] == ["good", "fine", "ok"]
    assert rows["s/a.txt#2"]["text"].startswith("also good é")
    for id_ in bad_ids:
        if policy == "drop":
            assert (rows[id_]["reason"], rows[id_]["text"]) == ("invalid_utf8", ""), id_
        else:
            assert rows[id_]["reason"] == "" and "\ufffd" in rows[id_]["text"], id_
            rows[id_]["text"].encode("utf-8")  # storable as Arrow string


def test_mostly_undecodable_file_is_binary_under_drop(tmp_path):
    store = ObjectStore()
    (tmp_path / "latin.txt").write_bytes(bytes(range(0x80, 0x100)) * 10)
    task = plan_files(store, _data(("s", str(tmp_path))))[0]
    assert _one(_read(store, task, "drop"))["reason"] == "binary"
    assert _one(_read(store, task, "replace"))["reason"] == ""


def test_jsonl_document_level_problems(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "j")
    lines = [b"{broken", b'{"text": "a"}', b"", b'{"body": "no text"}', b'{"text": 5}', b"[1, 2]",
             b'{"text": "b"}\r', b"also broken", b'"just a string"']
    _put(store, root, {"a.jsonl": b"\n".join(lines)})
    rows = _read_source(store, root)
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("s/a.jsonl#0", "bad_json_line"), ("s/a.jsonl#1", ""), ("s/a.jsonl#3", "missing_field"),
        ("s/a.jsonl#4", "missing_field"), ("s/a.jsonl#5", "missing_field"), ("s/a.jsonl#6", ""),
        ("s/a.jsonl#7", "bad_json_line"), ("s/a.jsonl#8", "missing_field")]
    assert [r["text"] for r in rows if not r["reason"]] == ["a", "b"]
    assert all(r["detail"] for r in rows if r["reason"]) and all(r["reason"] in DOCUMENT_REASONS | {""} for r in rows)


def test_parquet_null_and_binary_rows(tmp_path):
    store = ObjectStore()
    table = pa.table({"body": pa.array(["a", None, "c"] * 1000, pa.large_string())})
    (tmp_path / "a.parquet").write_bytes(_parquet(table))
    rows = _read_source(store, str(tmp_path), text_field="body")
    assert len(rows) == 3000 and rows[2999]["id"] == "s/a.parquet#2999"
    assert [(r["text"], r["reason"]) for r in rows[:3]] == [("a", ""), ("", "missing_field"), ("c", "")]


def test_unreadable_objects_never_raise(store_root):
    store, root = store_root.store, join_uri(store_root.uri, "u")
    _put(store, root, {"a.txt": b"hello", "b.parquet.gz": gzip.compress(_parquet(pa.table({"text": ["x"]})))})
    tasks = plan_files(store, _data(("s", root)))
    for task in ({**tasks[0], "uri": join_uri(root, "gone.txt"), "size": -1},
                 {**tasks[0], "uri": join_uri(root, "gone.txt"), "size": 5}, tasks[1]):
        row = _one(_read(store, task))
        assert (row["reason"], row["text"]) == ("unreadable", "") and row["detail"], row

    def broken_factory(uri):
        raise StorageError(f"{uri}: cannot reach the S3 endpoint")

    rows = list(read_file_task(tasks[0], filesystem_factory=broken_factory, clean=CleanConfig(),
                               max_file_bytes=100))
    assert _one(rows)["reason"] == "unreadable" and "cannot reach" in rows[0]["detail"]


def test_only_the_objects_own_faults_skip_it_a_bug_fails_the_run(store_root):
    """An OSError (I/O) makes the object unreadable; any other exception (a bug, e.g. a NaN where a string
    belongs) propagates instead of being filed as bad input; a null delimiter plans as "" (one document)."""
    store, root = store_root.store, join_uri(store_root.uri, "f")
    _put(store, root, {"a.txt": b"one\n\ntwo"})
    task = plan_files(store, _data(("s", root), delimiter=None))[0]
    assert task["delimiter"] == "" and [r["text"] for r in _read(store, task)] == ["one\n\ntwo"]

    def failing(err):
        def factory(uri):
            raise err
        return factory

    row = _one(list(read_file_task(task, filesystem_factory=failing(OSError("disk gone")), clean=CleanConfig(),
                                   max_file_bytes=100)))
    assert row["reason"] == "unreadable" and "disk gone" in row["detail"]
    with pytest.raises(AttributeError):
        list(read_file_task({**task, "delimiter": float("nan")}, filesystem_factory=store.pyarrow_filesystem,
                            clean=CleanConfig(), max_file_bytes=100))


@pytest.mark.s3
def test_wrong_credentials_on_the_worker_are_unreadable_without_secrets(s3_server):
    root = f"s3://{s3_server.new_bucket()}/w"
    store = s3_server.store(root=root)
    _put(store, root, {"a.txt": b"hello"})
    task = plan_files(store, _data(("s", root)))[0]
    bad = s3_server.store(root=root, secret_access_key="wrong-secret-value-123")
    for size in (-1, 5):  # fails on the worker's HEAD, or on the open
        rows = list(read_file_task({**task, "size": size}, filesystem_factory=bad.pyarrow_filesystem,
                                   clean=CleanConfig(), max_file_bytes=100))
        row = _one(rows)
        assert row["reason"] == "unreadable" and "ACCESS_DENIED" in row["detail"]
        for secret in ("wrong-secret-value-123", s3_server.secret_key, s3_server.access_key):
            assert secret not in row["detail"]
