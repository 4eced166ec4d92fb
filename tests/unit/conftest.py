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
