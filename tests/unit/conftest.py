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


@pytest.fixture
def write_manifest():
    """``write_manifest(store, data_uri, shards, tokenizer, seq_len, kind)``: a manifest naming ``shards``
    (``{"path", "split", "rows"}`` dicts): a continual mix's (the default), or prepared data's (``text``,
    ``sft``) with empty counts."""
    from lm.config import join_uri
    from lm.data.manifest import DataManifest, MixManifest, ShardEntry, TokenizerEntry, add_shards

    def write(store, data_uri: str, shards: list[dict], tokenizer: BPETokenizer, seq_len: int,
              kind: str = "continual-mix") -> MixManifest | DataManifest:
        entries = [ShardEntry(**s) for s in shards]
        common = {"kind": kind, "inputs_fingerprint": "test", "seq_len": seq_len, "row_length": seq_len + 1,
                  "tokenizer": TokenizerEntry.of(tokenizer), "shards": entries, "splits": add_shards({}, entries)}
        if kind == "continual-mix":
            manifest = MixManifest(**common, parts={}, counts={}, inputs={})
        else:
            manifest = DataManifest(**common, config_hash="test", sources={}, dropped={}, dedup={},
                                    skipped_objects=[], files=len(shards))
        store.write_bytes(join_uri(data_uri, "manifest.json"), manifest.dumps())
        return manifest

    return write
