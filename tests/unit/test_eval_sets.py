"""lm.eval.sets reads a set a bounded piece at a time: a split's row groups only up to ``max_rows`` (and the
n-gram's sample up to its token budget), text packed piece by piece with the input read no further than
the rows need, supervised rows through their masks, re-tokenized documents carried across pieces."""


import numpy as np
import pytest

from lm.config import TokenizerConfig, load_config
from lm.config.eval import EvalSetConfig
from lm.data.loader import shard_bytes
from lm.data.stream import ParquetSplit
from lm.eval.sets import Piece, load_set, ngram_train_rows, packed_rows, split_rows, text_rows
from lm.storage import ObjectStore
from lm.tokenizer import train_tokenizer

SEQ = 8  # rows of 9 tokens


@pytest.fixture
def reads(monkeypatch):
    """The row groups read (ParquetSplit.read's unit indices), in order."""
    seen: list[int] = []
    real = ParquetSplit.read

    def counted(self, i):
        seen.append(i)
        return real(self, i)

    monkeypatch.setattr(ParquetSplit, "read", counted)
    return seen


def write_data(write_manifest, tmp_path, tok, rows: dict[str, np.ndarray], mask=None, kind="text", group_rows=4):
    """A data directory at the default run's data path: each split in two shards of ``group_rows``-row groups."""
    cfg = load_config(None, [f"storage.root={tmp_path}"])
    store, data = ObjectStore(cfg.storage), f"{tmp_path}/runs/default/data"
    shards = []
    for split, r in rows.items():
        for j, part in enumerate(np.array_split(np.arange(len(r)), 2)):
            path = f"{split}-{j}.parquet"
            store.write_bytes(f"{data}/{path}", shard_bytes(r[part], None if mask is None else mask[part], group_rows))
            shards.append({"path": path, "split": split, "rows": len(part)})
    store.write_text(f"{data}/tokenizer.json", tok.to_json())
    write_manifest(store, data, shards, tok, SEQ, kind)
    return cfg, store


def numbered(n: int) -> np.ndarray:
    rows = np.tile(np.arange(SEQ + 1, dtype=np.int32) + 3, (n, 1))
    rows[:, 0] = np.arange(n)
    return rows


def test_packed_rows_come_in_bounded_pieces_and_read_no_further_than_max_rows():
    docs = [list(range(5, 5 + n)) for n in (3, 30, 1, 7, 12, 2, 19)]
    whole = text_rows(docs, SEQ, eos_id=0)
    for piece_rows in (1, 2, 5):
        pieces = list(packed_rows(docs, SEQ, 0, piece_rows=piece_rows))
        assert max(len(p) for p in pieces) <= piece_rows
        assert np.array_equal(np.concatenate(pieces), whole)
    taken: list[int] = []

    def counted():
        for i, d in enumerate(docs):
            taken.append(i)
            yield d

    first = np.concatenate(list(packed_rows(counted(), SEQ, 0, max_rows=3, piece_rows=2)))
    assert np.array_equal(first, whole[:3])
    assert taken == [0, 1]  # 3 rows need 25 tokens: the first two documents hold 36
    assert text_rows([], SEQ, 0).tolist() == [[0] + [-1] * SEQ]  # an empty set: one row, nothing scored


def test_a_split_is_read_a_row_group_at_a_time_up_to_max_rows(tmp_path, small_tokenizer, reads, write_manifest):
    val = numbered(40)  # two shards of 20 rows, row groups of 4: ten units
    cfg, store = write_data(write_manifest, tmp_path, small_tokenizer, {"val": val, "train": numbered(40)})
    found = split_rows(store, cfg, "val", small_tokenizer, SEQ, max_rows=10)
    assert (found.n_rows, found.shard_uris) == (10, None) and reads == []  # nothing read before the first piece
    pieces = list(found.pieces)
    assert [len(p) for p in pieces] == [4, 4, 2]
    assert np.array_equal(np.concatenate([p.rows for p in pieces]), val[:10])
    assert reads == [0, 1, 2]  # no row group past the tenth row
    whole = load_set(store, cfg, EvalSetConfig(name="v", split="val"), small_tokenizer, SEQ)
    assert whole.n_rows == 40 and len(whole.shard_uris) == 2  # the Ray backend may read the files as they are
    reads.clear()
    assert max(len(p) for p in whole.pieces) == 4 and reads == list(range(10))
    reads.clear()
    rows, note = ngram_train_rows(store, cfg, small_tokenizer, SEQ, max_tokens=6 * (SEQ + 1) + 5)
    assert np.array_equal(rows, numbered(40)[:6]) and reads == [0, 1] and "54 tokens" in note


def test_supervised_rows_are_scored_through_their_masks(tmp_path, small_tokenizer, write_manifest):
    rows = numbered(12)
    mask = np.zeros_like(rows, dtype=np.uint8)
    mask[:, 5:] = 1
    cfg, store = write_data(write_manifest, tmp_path, small_tokenizer, {"val": rows, "train": rows}, mask, kind="sft")
    found = split_rows(store, cfg, "val", small_tokenizer, SEQ)
    assert found.masked and "responses" in found.note
    pieces = list(found.pieces)
    assert np.array_equal(np.concatenate([p.rows for p in pieces]), rows)  # every token is read
    assert np.array_equal(np.concatenate([p.loss_mask for p in pieces]), mask)  # and scored through its mask
    every = list(split_rows(store, cfg, "val", small_tokenizer, SEQ, every_token=True).pieces)
    assert np.array_equal(np.concatenate([p.rows for p in every]), rows)
    assert all(p.loss_mask is None for p in every)


def test_another_tokenizers_split_is_decoded_across_pieces_and_re_encoded(tmp_path, small_tokenizer, write_manifest):
    texts = [f"ROMEO: speech number {i} of the night, and some more words." for i in range(30)]
    stream = [t for doc in small_tokenizer.encode_batch(texts) for t in [*doc, small_tokenizer.eos_id]]
    n = len(stream) // (SEQ + 1)
    cfg, store = write_data(write_manifest, tmp_path, small_tokenizer,
                            {"val": np.array(stream[: n * (SEQ + 1)], np.int32).reshape(n, -1)},
                            group_rows=3)  # documents straddle rows, row groups and shards
    other = train_tokenizer(texts * 5, TokenizerConfig(vocab_size=300, min_frequency=1))
    found = split_rows(store, cfg, "val", other, SEQ)
    assert found.n_rows is None and "re-tokenized" in found.note
    kept = small_tokenizer.decode(stream[: n * (SEQ + 1)]).split(small_tokenizer.eos_token)
    expected = text_rows(other.encode_batch([t for t in kept if t]), SEQ, other.eos_id)
    assert np.array_equal(np.concatenate([p.rows for p in found.pieces]), expected)
    capped = [p.rows for p in split_rows(store, cfg, "val", other, SEQ, max_rows=5).pieces]
    assert np.array_equal(np.concatenate(capped), expected[:5])


def test_a_piece_goes_to_the_ray_actors_in_the_shards_columns():
    """lm.eval.distributed sends pieces as the shards' own columns: the actors read both alike."""
    from lm.eval.distributed import _piece_table

    rows, mask = numbered(3), np.zeros((3, SEQ + 1), np.uint8)
    mask[:, 4:] = 1
    table = _piece_table(Piece(rows, mask))
    assert table.column_names == ["tokens", "loss_mask"]
    assert np.array_equal(np.array(table["tokens"].to_pylist()), rows)
    assert np.array_equal(np.array(table["loss_mask"].to_pylist()), mask)
    assert _piece_table(Piece(rows)).column_names == ["tokens"]
