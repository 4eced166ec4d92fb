"""Streaming documents out of sources, and the deterministic split (pure, no Ray)."""

import gzip
import json

import pytest

from lm.config import SourceConfig
from lm.data.documents import iter_documents, resolve_source, split_stream
from lm.data.split import hash_unit, split_of
from lm.storage import ObjectStore


def test_split_stream_across_chunk_boundaries():
    chunks = iter(["a\n", "\nb", "b\n\n", "\ncc\n", "\n"])
    assert list(split_stream(chunks, "\n\n")) == ["a", "bb", "\ncc", ""]
    assert list(split_stream(iter(["x", "y"]), None)) == ["xy"]


def test_txt_gz_and_jsonl_sources(tmp_path):
    store = ObjectStore()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one\n\ntwo\n\n\n\nthree")
    with gzip.open(folder / "sub" / "b.txt.gz", "wt") as f:
        f.write("four\n\nfive é")
    (folder / "c.jsonl").write_text(json.dumps({"text": "six"}) + "\n\n" + json.dumps({"body": "x"}) + "\n")
    docs = list(iter_documents(store, SourceConfig(name="s", uri=str(folder))))
    assert [d.text for d in docs] == ["one", "two", "three", "six", "four", "five é"]
    assert docs[0].id == "s/a.txt#0" and docs[-1].id == "s/sub/b.txt.gz#1"
    only_txt = list(iter_documents(store, SourceConfig(name="s", uri=f"{folder}/*.txt")))
    assert [d.text for d in only_txt] == ["one", "two", "three"]


def test_bundled_corpus_streams():
    docs = iter_documents(ObjectStore(), SourceConfig(name="ts", uri="bundled://tinyshakespeare"))
    first = next(docs)
    assert first.text.startswith("First Citizen:") and first.id == "ts/tinyshakespeare#0"


def test_source_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no objects"):
        resolve_source(ObjectStore(), f"{tmp_path}/nothing-here/*.txt")


def test_split_is_deterministic_and_proportional():
    ids = [f"src/file#{i}" for i in range(20_000)]
    val = [i for i in ids if split_of(i, 0.1) == "val"]
    assert 0.09 < len(val) / len(ids) < 0.11
    assert val == [i for i in ids if split_of(i, 0.1) == "val"]
    assert all(0 <= hash_unit(i) < 1 for i in ids[:100])
    # growing the corpus never moves an old document
    more = ids + [f"src/new#{i}" for i in range(5_000)]
    assert [i for i in more[:20_000] if split_of(i, 0.1) == "val"] == val
