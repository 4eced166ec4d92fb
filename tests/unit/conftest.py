"""Fixtures shared by the unit tests (no Ray)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from lm.config import TokenizerConfig
from lm.tokenizer import BPETokenizer, train_tokenizer

CORPUS = Path(__file__).parents[2] / "lm" / "corpora" / "tinyshakespeare.txt.gz"


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: one thread is fastest and keeps timings steady on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_tokenizer() -> BPETokenizer:
    """A 400-token BPE tokenizer trained on the first 60 kB of the bundled corpus."""
    text = gzip.decompress(CORPUS.read_bytes()).decode()[:60_000]
    return train_tokenizer(iter(text.split("\n\n")), TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="session")
def small_model():
    """``small_model(tokenizer, **model_fields)``: a seeded 2-layer GQA transformer over the tokenizer's
    vocabulary (d_model 32, 64-token context unless overridden), in eval mode."""
    from lm.config import ModelConfig
    from lm.model import Transformer

    def build(tokenizer: BPETokenizer, **overrides):
        torch.manual_seed(0)
        cfg = ModelConfig(**{"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 32, "max_seq_len": 64,
                             "vocab_size": tokenizer.vocab_size, **overrides})
        return Transformer(cfg).eval()

    return build
