"""Single-process document streaming, and the deterministic split (no Ray)."""

import gzip
import json

import numpy as np
import pytest

from lm.config import DataConfig, SourceConfig
from lm.data.documents import iter_documents
from lm.data.sources import DataError
from lm.data.split import assign_split, hash_unit, mixing_copies, split_batch, split_of
from lm.storage import ObjectStore


def test_documents_are_read_cleaned_and_split(tmp_path):
    store = ObjectStore()
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("one\n\ntwo  \r\n\n\n\nthree")
    with gzip.open(folder / "sub" / "b.txt.gz", "wt") as f:
        f.write("four\n\nfive é")
    (folder / "c.jsonl").write_text(json.dumps({"text": "six"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    data = DataConfig(sources=[SourceConfig(name="s", uri=str(folder))], val_fraction=0.5)
    assert list(iter_documents(store, data)) == []  # the web-text defaults: too few words, not English
    data = data.model_copy(update={"languages": [], "quality": data.quality.model_copy(update={"enabled": False})})
    docs = list(iter_documents(store, data))
    assert sorted(d.text for d in docs) == ["five é", "four", "one", "six", "three", "two"]
    assert {d.id for d in docs} >= {"s/a.txt#0", "s/sub/b.txt.gz#1"}
    train = {d.id for d in iter_documents(store, data, split="train")}
    val = {d.id for d in iter_documents(store, data, split="val")}
    assert train | val == {d.id for d in docs} and not train & val


def test_bundled_corpus_streams():
    data = DataConfig(sources=[SourceConfig(name="ts", uri="bundled://tinyshakespeare")], languages=[],
                      quality={"enabled": False})
    first = next(iter_documents(ObjectStore(), data))
    assert first.text.startswith("First Citizen:") and first.id == "ts/tinyshakespeare#0"


def test_source_matching_nothing_is_a_clear_error(tmp_path):
    data = DataConfig(sources=[SourceConfig(name="s", uri=f"{tmp_path}/nothing-here/*.txt")])
    with pytest.raises(DataError, match="nothing-here"):
        list(iter_documents(ObjectStore(), data))


def test_split_is_deterministic_and_proportional():
    ids = [f"src/file#{i}" for i in range(20_000)]
    val = [i for i in ids if split_of(i, 0.1) == "val"]
    assert 0.09 < len(val) / len(ids) < 0.11
    assert val == [i for i in ids if split_of(i, 0.1) == "val"]
    assert all(0 <= hash_unit(i) < 1 for i in ids[:100])
    # growing the corpus never moves an old document
    more = ids + [f"src/new#{i}" for i in range(5_000)]
    assert [i for i in more[:20_000] if split_of(i, 0.1) == "val"] == val


def test_assign_split_proportions_and_stability():
    ids = [f"src{i % 3}/file#{i}" for i in range(20_000)]
    splits = [assign_split(i, 0.1, 0.05) for i in ids]
    assert abs(splits.count("val") / len(ids) - 0.1) < 0.015
    assert abs(splits.count("test") / len(ids) - 0.05) < 0.015
    assert set(splits) == {"train", "val", "test"}
    # stratified by source: each source gets about the same shares of its own documents
    for src in ("src0", "src1", "src2"):
        own = [s for i, s in zip(ids, splits, strict=True) if i.startswith(src + "/")]
        assert abs(own.count("val") / len(own) - 0.1) < 0.015
    # adding documents never moves old ones
    more = [f"src9/new#{i}" for i in range(5_000)] + ids
    assert [assign_split(i, 0.1, 0.05) for i in more[5_000:]] == splits
    # test_fraction=0 agrees with split_of; raising test only moves train documents
    assert all(assign_split(i, 0.1) == split_of(i, 0.1) for i in ids[:2_000])
    for i, s in zip(ids[:2_000], splits, strict=False):
        wider = assign_split(i, 0.1, 0.2)
        assert (wider == "val") == (s == "val")
        assert wider == s or (s, wider) == ("train", "test")
    assert {assign_split(i, 0.0, 0.0) for i in ids[:500]} == {"train"}
    with pytest.raises(ValueError, match="val_fraction"):
        assign_split("x", 0.7, 0.4)


def test_split_batch_adds_column():
    ids = np.array([f"s/f#{i}" for i in range(100)], dtype=object)
    batch = {"id": ids, "text": ["t"] * 100}
    out = split_batch(batch, 0.2, 0.1)
    assert out["split"] == [assign_split(i, 0.2, 0.1) for i in ids]
    assert out["text"] is batch["text"] and out["id"] is ids and "split" not in batch
    assert split_batch({"id": []}, 0.1)["split"] == []
    with pytest.raises(KeyError, match="id"):
        split_batch({"text": ["x"]}, 0.1)
    # a source pinned to one split: all its documents go there, the others keep the hash split
    mixed = {"id": ids, "source": ["held"] * 50 + ["web"] * 50}
    pinned = split_batch(mixed, 0.2, 0.1, fixed={"held": "val"})["split"]
    assert pinned[:50] == ["val"] * 50 and pinned[50:] == [assign_split(i, 0.2, 0.1) for i in ids[50:]]


def test_mixing_copies_reweights_train_only_and_is_stable():
    ids = [f"src/f#{i}" for i in range(4000)]
    assert all(mixing_copies(i, "train", 1.0) == 1 for i in ids)
    assert all(mixing_copies(i, "train", 3.0) == 3 for i in ids)
    assert all(mixing_copies(i, split, 0.1) == 1 for i in ids for split in ("val", "test"))
    quarter = [mixing_copies(i, "train", 0.25) for i in ids]
    assert set(quarter) == {0, 1} and abs(sum(quarter) / len(ids) - 0.25) < 0.03
    more = [mixing_copies(i, "train", 1.5) for i in ids]
    assert set(more) == {1, 2} and abs(sum(more) / len(ids) - 1.5) < 0.03
    # a document's count depends on its id only (new documents never change old ones) and nests:
    # every document kept at weight 0.25 is kept at 0.5
    assert quarter == [mixing_copies(i, "train", 0.25) for i in reversed(ids)][::-1]
    assert all(mixing_copies(i, "train", 0.5) >= q for i, q in zip(ids, quarter, strict=True))
    with pytest.raises(ValueError, match="weight"):
        mixing_copies("x", "train", 0)
