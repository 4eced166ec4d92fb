"""Token-level sums → loss, perplexity, bits per byte and next-token top-1 accuracy (pure torch, one process).

Rows are packed token rows ``[n, seq_len + 1]`` (the shards' layout, lm.data.pack): inputs ``row[:-1]``,
targets ``row[1:]``. −1 is padding (the tail of a text set's last row, lm.eval.sets), neither scored nor
fed to the model (padding only ever follows the real tokens, and attention is causal). A ``loss_mask``
beside the rows (supervised shards: 0 on the prompt) makes its 0 targets :data:`lm.loss_mask.IGNORE`, as
training does (lm.data.pack.rows_to_inputs_targets): read, not scored, so SFT data is scored on its
responses as it trains. A negative target is never scored.

Bits per byte = the summed negative log-likelihood in bits ÷ the UTF-8 bytes that the scored target
tokens encode. :func:`token_byte_lengths` gives those bytes per token id: in a byte-level BPE every
symbol of a token stands for exactly one byte, and special tokens (end-of-text) stand for none. It does
not depend on the tokenizer, so models with different vocabularies compare; a model that spreads its
probability evenly over V tokens scores ``log2(V) × tokens ÷ bytes``.

    table = token_byte_lengths(tokenizer, model.cfg.vocab_size)
    sums = model_sums(model, rows, table, batch_size=16)     # TokenSums; sums add up across shards
    sums = model_sums(model, rows, table, loss_mask=mask)    # supervised rows: their responses only
    sums.metrics()   # {"loss", "perplexity", "bpb", "accuracy", "tokens", "bytes"}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lm.data.pack import rows_to_inputs_targets
from lm.tokenizer import BPETokenizer


@dataclass
class TokenSums:
    """Totals over scored tokens; ``correct`` is None for scorers without a top-1 guess (the n-gram)."""

    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0
    correct: int | None = 0

    def __add__(self, other: TokenSums) -> TokenSums:
        correct = None if self.correct is None or other.correct is None else self.correct + other.correct
        return TokenSums(self.nll + other.nll, self.tokens + other.tokens, self.bytes + other.bytes, correct)

    def metrics(self) -> dict[str, float]:
        """loss (nats/token), perplexity, bpb (bits/byte), accuracy (top-1), tokens, bytes."""
        if self.tokens <= 0:
            raise ValueError("no tokens were scored: the eval set is empty")
        loss = self.nll / self.tokens
        out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
               "bpb": self.nll / math.log(2) / self.bytes if self.bytes else math.nan}
        if self.correct is not None:
            out["accuracy"] = self.correct / self.tokens
        return {**out, "tokens": self.tokens, "bytes": self.bytes}

    def to_dict(self) -> dict:
        return {"nll": self.nll, "tokens": self.tokens, "bytes": self.bytes, "correct": self.correct}


def token_byte_lengths(tokenizer: BPETokenizer, size: int | None = None) -> np.ndarray:
    """UTF-8 bytes each token id stands for (int64 [size]); special and unused ids (≥ the tokenizer's
    vocabulary, up to the model's ``size``) stand for 0. Only for byte-level BPE (lmforge's tokenizer)."""
    from tokenizers import pre_tokenizers

    inner = tokenizer.tokenizer
    vocab = inner.get_vocab(with_added_tokens=True)
    size = max(size or 0, tokenizer.vocab_size)
    special = set(inner.get_added_tokens_decoder())
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    table = np.zeros(size, dtype=np.int64)
    for token, index in vocab.items():
        if index in special:
            continue
        if not set(token) <= alphabet:
            raise ValueError(f"token {token!r} (id {index}) is not byte-level BPE: bytes per token are unknown")
        table[index] = len(token)
    return table


def sums_from_logits(logits: torch.Tensor, targets: torch.Tensor, token_bytes: torch.Tensor) -> TokenSums:
    """Sums over the non-negative ``targets`` [B, T] of ``logits`` [B, T, V] (nats; byte table [≥ V])."""
    keep = targets >= 0
    flat_logits = logits.reshape(-1, logits.size(-1))[keep.reshape(-1)].float()
    flat_targets = targets[keep]
    nll = F.cross_entropy(flat_logits, flat_targets, reduction="none").double().sum().item()
    correct = (flat_logits.argmax(dim=-1) == flat_targets).sum().item()
    n_bytes = token_bytes[flat_targets].sum().item()
    return TokenSums(nll, int(flat_targets.numel()), int(n_bytes), int(correct))


@torch.no_grad()
def model_sums(model: torch.nn.Module, rows: np.ndarray, token_bytes: np.ndarray, batch_size: int = 16,
               device: str | torch.device = "cpu", loss_mask: np.ndarray | None = None) -> TokenSums:
    """Score every row of ``rows`` with ``model`` (a :class:`lm.model.Transformer`), ``batch_size`` at a time
    (``loss_mask``, the rows' shape: only the targets whose mask is 1)."""
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows must have shape [n, seq_len + 1], got {tuple(rows.shape)}")
    was_training = model.training
    model.eval()
    table = torch.as_tensor(token_bytes, device=device)
    total = TokenSums()
    try:
        for start in range(0, len(rows), batch_size):
            end = start + batch_size
            batch = torch.from_numpy(np.asarray(rows[start:end], dtype=np.int64)).to(device)  # [b, T + 1]
            mask = None if loss_mask is None else torch.as_tensor(loss_mask[start:end], device=device)
            inputs, targets = rows_to_inputs_targets(batch, mask)  # [b, T] each; mask 0: IGNORE
            logits, _ = model(inputs.clamp(min=0))  # padding (-1) read as 0: it only follows the real tokens
            total = total + sums_from_logits(logits, targets, table)
    finally:
        model.train(was_training)
    return total


def score_rows(model: torch.nn.Module, rows: np.ndarray, token_bytes: np.ndarray, batch_size: int = 16,
               baseline=None, device: str | torch.device = "cpu",
               loss_mask: np.ndarray | None = None) -> dict[str, TokenSums]:
    """``{"model": sums}``, plus ``"ngram"`` when a ``baseline`` (anything with ``.nll(rows, loss_mask=)`` in
    nats, e.g. lm.eval.ngram.NGramLM) scores the same targets: one scorer for both backends."""
    sums = model_sums(model, rows, token_bytes, batch_size, device, loss_mask)
    out = {"model": sums}
    if baseline is not None:
        out["ngram"] = TokenSums(baseline.nll(rows, loss_mask=loss_mask), sums.tokens, sums.bytes, None)
    return out
