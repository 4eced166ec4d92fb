"""Packing documents into fixed-length training rows (lm.data.pack)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lm.data.pack import pack_rows, rows_to_inputs_targets, unpack_documents

EOS = 0


def test_exact_rows_with_eos_between_documents():
    rows, dropped = pack_rows([[1, 2, 3], [4, 5], [6, 7, 8, 9]], seq_len=3, eos_id=EOS)
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E  (12 tokens) → 3 rows of 4, nothing left
    assert rows.dtype == np.int32 and rows.shape == (3, 4)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    assert dropped == 0


def test_tail_is_dropped_and_counted():
    rows, dropped = pack_rows([[1, 2, 3, 4, 5], [6, 7]], seq_len=2, eos_id=99)
    # stream: 1 2 3 4 5 99 6 7 99 (9 tokens) → 3 rows of 3, nothing left
    assert rows.tolist() == [[1, 2, 3], [4, 5, 99], [6, 7, 99]] and dropped == 0
    rows, dropped = pack_rows([np.arange(1, 8)], seq_len=2, eos_id=99)
    # stream: 1..7 99 (8 tokens) → 2 rows of 3, 2 tokens (7, 99) dropped
    assert rows.tolist() == [[1, 2, 3], [4, 5, 6]] and dropped == 2


def test_empty_input_and_short_input():
    rows, dropped = pack_rows([], seq_len=4, eos_id=EOS)
    assert rows.shape == (0, 5) and rows.dtype == np.int32 and dropped == 0
    rows, dropped = pack_rows(iter([[1]]), seq_len=4, eos_id=EOS)
    assert rows.shape == (0, 5) and dropped == 2


def test_deterministic_and_generator_input():
    docs = [list(range(i, i + i % 7)) for i in range(50)]
    a, da = pack_rows(docs, 8, 1000)
    b, db = pack_rows((np.asarray(d) for d in docs), 8, 1000)
    assert np.array_equal(a, b) and da == db


def test_bad_arguments():
    with pytest.raises(ValueError, match="seq_len"):
        pack_rows([[1]], seq_len=0, eos_id=EOS)
    with pytest.raises(ValueError, match="int32"):
        pack_rows([[2**40]], seq_len=1, eos_id=EOS)


def test_inputs_targets_shift_by_one():
    rows, _ = pack_rows([[1, 2, 3], [4, 5, 6]], seq_len=3, eos_id=EOS)
    inputs, targets = rows_to_inputs_targets(rows)
    assert inputs.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert targets.tolist() == [[2, 3, 0], [5, 6, 0]]
    assert np.shares_memory(inputs, rows)  # views, no copy
    with pytest.raises(ValueError, match="shape"):
        rows_to_inputs_targets(np.zeros(5))


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(1, 50_000), max_size=40), max_size=30),
    seq_len=st.integers(1, 64),
)
def test_token_count_is_conserved(docs, seq_len):
    rows, dropped = pack_rows(docs, seq_len, EOS)
    total = sum(len(d) + 1 for d in docs)
    assert rows.shape == (rows.shape[0], seq_len + 1)
    assert total == rows.size + dropped
    assert 0 <= dropped < seq_len + 1
    stream = [t for d in docs for t in [*d, EOS]]
    assert rows.reshape(-1).tolist() == stream[: rows.size]


def test_supervised_examples_pack_with_their_masks_and_mask_the_prompt_targets():
    import torch

    from lm.data.pack import pack_examples

    # two examples: prompt 1 2 → response 3 E; prompt 4 → response 5 6 E   (E = end-of-text)
    examples = [([1, 2, 3, EOS], [0, 0, 1, 1]), ([4, 5, 6, EOS], [0, 1, 1, 1])]
    rows, masks, dropped = pack_examples(examples, seq_len=3)
    assert rows.tolist() == [[1, 2, 3, 0], [4, 5, 6, 0]] and masks.tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert dropped == 0 and rows.dtype == np.int32 and masks.dtype == np.uint8
    inputs, targets = rows_to_inputs_targets(torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(masks))
    # the target at position t is the token t+1, counted only where that token is part of a response
    assert inputs.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert targets.tolist() == [[-100, 3, 0], [5, 6, 0]]
    with pytest.raises(ValueError, match="mask of 3"):
        pack_examples([([1, 2], [0, 1, 1])], seq_len=3)


@settings(max_examples=60, deadline=None)
@given(docs=st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=12), max_size=20),
       seq_len=st.integers(1, 9), block=st.integers(1, 4))
def test_unpacking_a_shards_rows_gives_its_documents_back(docs, seq_len, block):
    rows, dropped = pack_rows(docs, seq_len=seq_len, eos_id=EOS)
    blocks = [rows[i:i + block] for i in range(0, len(rows), block)]  # row groups, in stored order
    back = [d.tolist() for d in unpack_documents(blocks, EOS)]
    stream = [t for d in docs for t in [*d, EOS]][: len(rows) * (seq_len + 1)]
    whole = stream.count(EOS)  # documents whose end-of-text made it into a row
    assert back[:whole] == docs[:whole]
    if len(back) > whole:  # the one cut by the dropped partial row: its head
        assert len(back) == whole + 1 and docs[whole][: len(back[-1])] == back[-1] and dropped > 0
