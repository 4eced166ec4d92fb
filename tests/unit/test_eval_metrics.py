"""Evaluation sums: hand-computed loss / accuracy / bits per byte, the byte table, the uniform model, text
rows, and rows scored through a loss mask (supervised data) as training scores them."""

import math

import numpy as np
import pytest
import torch

from lm.config import ModelConfig, TokenizerConfig
from lm.eval.metrics import (
    TokenSums,
    model_sums,
    score_rows,
    sums_from_logits,
    token_byte_lengths,
)
from lm.eval.ngram import NGramLM
from lm.eval.sets import text_rows
from lm.model import Transformer
from lm.tokenizer import train_tokenizer

TEXTS = ["ROMEO:\nBut soft, what light through yonder window breaks?", "Café, naïve, 日本語 — “quotes”.",
         "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?"] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, TokenizerConfig(vocab_size=320, min_frequency=1))


def test_two_token_toy_case_by_hand():
    # position 0: p = [1/4, 1/4, 1/2], target 2 → nll ln 2, top-1 right
    # position 1: p = [1/5, 3/5, 1/5], target 0 → nll ln 5, top-1 wrong (guesses 1)
    logits = torch.tensor([[[0.0, 0.0, math.log(2)], [0.0, math.log(3), 0.0]]])
    targets = torch.tensor([[2, 0]])
    sums = sums_from_logits(logits, targets, torch.tensor([1, 2, 3]))
    assert sums.tokens == 2 and sums.correct == 1 and sums.bytes == 3 + 1
    assert sums.nll == pytest.approx(math.log(10))
    m = sums.metrics()
    assert m["loss"] == pytest.approx(math.log(10) / 2)
    assert m["perplexity"] == pytest.approx(math.sqrt(10))
    assert m["accuracy"] == 0.5
    assert m["bpb"] == pytest.approx(math.log2(10) / 4)


def test_padding_targets_are_not_scored():
    logits = torch.zeros(1, 3, 4)
    sums = sums_from_logits(logits, torch.tensor([[1, -1, -1]]), torch.ones(4, dtype=torch.long))
    assert (sums.tokens, sums.bytes) == (1, 1) and sums.nll == pytest.approx(math.log(4))


def test_sums_add_and_empty_set_is_an_error():
    total = TokenSums(1.0, 2, 3, 1) + TokenSums(2.0, 3, 4, 2)
    assert total == TokenSums(3.0, 5, 7, 3)
    assert (TokenSums(1.0, 2, 3, None) + total).correct is None
    with pytest.raises(ValueError, match="empty"):
        TokenSums().metrics()


def test_byte_table_counts_utf8_bytes_and_no_bytes_for_specials(tok):
    table = token_byte_lengths(tok, size=tok.vocab_size + 7)
    assert len(table) == tok.vocab_size + 7 and table[tok.vocab_size:].sum() == 0
    assert table[tok.eos_id] == 0 and table[tok.pad_id] == 0
    for text in ["Café, naïve, 日本語 — “quotes”.", "ROMEO:\n\tx  y", "emoji 🎭 and ü"]:
        assert table[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_text_rows_score_every_token_once():
    rows = text_rows([[5, 6, 7], [8]], seq_len=3, eos_id=0)
    assert rows.tolist() == [[0, 5, 6, 7], [7, 0, 8, 0]]
    rows = text_rows([[5, 6, 7, 8]], seq_len=3, eos_id=0)
    assert rows.tolist() == [[0, 5, 6, 7], [7, 8, 0, -1]]
    targets = rows[:, 1:]
    assert sorted(targets[targets >= 0].tolist()) == sorted([5, 6, 7, 8, 0])


def uniform_model(vocab: int) -> Transformer:
    """A real Transformer whose logits are all zero (untied output layer set to zero)."""
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=vocab, tie_embeddings=False)
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_uniform_model_bpb_is_log2_vocab_times_tokens_per_byte(tok):
    model = uniform_model(tok.vocab_size)
    docs = [tok.encode(t) for t in TEXTS[:6]]
    rows = text_rows(docs, seq_len=15, eos_id=tok.eos_id)
    table = token_byte_lengths(tok, model.cfg.vocab_size)
    m = model_sums(model, rows, table, batch_size=4).metrics()
    n_tokens = sum(map(len, docs)) + len(docs)  # every token and end-of-text is scored once
    n_bytes = sum(len(t.encode()) for t in TEXTS[:6])  # exactly the text's bytes
    assert (m["tokens"], m["bytes"]) == (n_tokens, n_bytes)
    assert m["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    assert m["bpb"] == pytest.approx(math.log2(tok.vocab_size) * n_tokens / n_bytes, rel=1e-6)
    assert m["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-5)


def test_model_sums_match_the_models_own_loss_and_ignore_batching(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=tok.vocab_size)
    model = Transformer(cfg).eval()
    rows = np.random.default_rng(0).integers(0, tok.vocab_size, size=(10, 17))
    table = token_byte_lengths(tok)
    one, many = model_sums(model, rows, table, batch_size=1), model_sums(model, rows, table, batch_size=7)
    assert one.nll == pytest.approx(many.nll, rel=1e-6) and one.correct == many.correct
    x = torch.from_numpy(rows).long()
    _, loss = model(x[:, :-1], x[:, 1:])
    assert one.metrics()["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_score_rows_puts_the_ngram_on_the_same_targets(tok):
    model = uniform_model(tok.vocab_size)
    rows = text_rows([tok.encode(t) for t in TEXTS], seq_len=15, eos_id=tok.eos_id)
    ngram = NGramLM.fit(rows, 2, tok.vocab_size)
    sums = score_rows(model, rows, token_byte_lengths(tok), 8, baseline=ngram)
    assert sums["ngram"].tokens == sums["model"].tokens and sums["ngram"].bytes == sums["model"].bytes
    assert sums["ngram"].nll == pytest.approx(ngram.nll(rows))
    assert "accuracy" not in sums["ngram"].metrics()
    assert sums["ngram"].metrics()["bpb"] < sums["model"].metrics()["bpb"]  # fitted on these rows: far better


def test_masked_rows_score_what_training_scores_and_read_every_token(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=1, n_heads=2, d_model=16, max_seq_len=16, vocab_size=tok.vocab_size)
    model = Transformer(cfg).eval()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, tok.vocab_size, size=(6, 17))
    mask = (rng.random((6, 17)) < 0.4).astype(np.uint8)  # the responses; position 0 is only ever read
    sums = model_sums(model, rows, token_byte_lengths(tok), batch_size=4, loss_mask=mask)
    x = torch.from_numpy(rows).long()
    logits, _ = model(x[:, :-1])  # the whole row is read, as in training
    keep = torch.from_numpy(mask[:, 1:] == 1)
    nll = torch.nn.functional.cross_entropy(logits[keep], x[:, 1:][keep], reduction="sum")
    assert sums.tokens == int(mask[:, 1:].sum()) and sums.nll == pytest.approx(nll.item(), rel=1e-5)
    ngram = NGramLM.fit(rows, 3, tok.vocab_size)  # the n-gram reads the unscored context too
    assert np.allclose(ngram.log_probs(rows, mask), np.where(mask[:, 1:] == 1, ngram.log_probs(rows), 0.0))
    assert ngram.nll(rows, chunk_rows=4, loss_mask=mask) == pytest.approx(-ngram.log_probs(rows, mask).sum())
