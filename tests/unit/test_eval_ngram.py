"""The Kneser-Ney n-gram baseline: hand-computed probabilities, normalisation, beating the unigram."""

import time

import numpy as np
import pytest

from lm.eval.ngram import NGramLM


def test_unigram_by_hand():
    # counts 0:2, 1:1 (V = 3); D = n1 / (n1 + 2 n2) = 1/3; P(w) = max(c − D, 0)/3 + D·2/3 · 1/3
    lm = NGramLM.fit(np.array([[0, 0, 1]]), order=1, vocab_size=3)
    assert lm.prob([], np.arange(3)) == pytest.approx([17 / 27, 8 / 27, 2 / 27])
    # nll of the targets of the row (tokens 0 and 1)
    assert lm.nll(np.array([[0, 0, 1]])) == pytest.approx(-np.log(17 / 27) - np.log(8 / 27))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_every_conditional_distribution_sums_to_one(order):
    rng = np.random.default_rng(order)
    rows = rng.integers(0, 12, size=(30, 9))
    lm = NGramLM.fit(rows, order, vocab_size=15)  # ids 12..14 never seen
    contexts = [[], [3], [3, 4], [1, 2, 3], [14, 14, 14], list(rows[0, :order])]
    for ctx in contexts:
        p = lm.prob(ctx, np.arange(15))
        assert p.sum() == pytest.approx(1.0) and (p > 0).all()


def test_beats_unigram_on_repetitive_text_and_predicts_the_cycle():
    cycle = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    stream = np.tile(cycle, 200)
    train, held_out = stream[:1280].reshape(-1, 32), stream[1280:].reshape(-1, 32)
    nll = {order: NGramLM.fit(train, order, 10).nll(held_out) for order in (1, 2, 3)}
    assert nll[3] < nll[2] < nll[1] / 3
    trigram = NGramLM.fit(train, 3, 10)
    assert trigram.prob([1, 4], [1])[0] > 0.95  # after "1 4" always comes 1
    assert trigram.prob([4, 1], [5])[0] > 0.95  # "1" alone is ambiguous; "4 1" is not


def test_padding_and_row_boundaries():
    lm = NGramLM.fit(np.array([[1, 2, 3, 1, 2, 3]]), 2, 5)
    rows = np.array([[1, 2, -1, -1]])
    lp = lm.log_probs(rows)
    assert lp.shape == (1, 3) and lp[0, 1] == 0 and lp[0, 2] == 0
    assert lm.nll(rows) == pytest.approx(-np.log(lm.prob([1], [2])[0]))
    # contexts never cross rows: the first target of a row sees only the row's first token
    assert lm.log_probs(np.array([[3, 1]]))[0, 0] == pytest.approx(np.log(lm.prob([3], [1])[0]))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="ngram_order"):
        NGramLM.fit(np.zeros((1, 4), dtype=int), order=5, vocab_size=70000)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        NGramLM.fit(np.array([[1, 9]]), order=2, vocab_size=5)


def test_fast_enough_for_tinyshakespeare_sized_input():
    rows = np.random.default_rng(0).integers(0, 2048, size=(2400, 129))  # ~310k tokens
    start = time.perf_counter()
    lm = NGramLM.fit(rows, 3, 2048)
    lm.nll(rows[:300])
    assert time.perf_counter() - start < 15  # ~1.5 s on 2 idle cores
