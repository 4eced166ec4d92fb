"""lm.serve.quantize: int8 Linear layers, the float model untouched, close logits, KV-cache generation."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as QLinear

from lm.model import KVCache, Transformer
from lm.serve.engine import Engine, GenRequest
from lm.serve.quantize import linear_weight_bytes, quantize_int8
from lm.tokenizer import BPETokenizer

CTX = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer


@pytest.fixture(scope="module")
def model(tok: BPETokenizer, small_model) -> Transformer:
    return small_model(tok, d_model=64, max_seq_len=CTX, init_std=0.02, tie_embeddings=True)


@pytest.fixture(scope="module")
def qmodel(model: Transformer) -> Transformer:
    return quantize_int8(model)


def test_linear_layers_become_int8_and_the_float_model_is_untouched(model, qmodel):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(isinstance(m, nn.Linear) for m in qmodel.modules())
    quantized = [m for m in qmodel.modules() if isinstance(m, QLinear)]
    assert len(quantized) == model.cfg.n_layers * 7 + 1  # q k v o gate up down per layer + lm_head
    assert all(m.weight().dtype == torch.qint8 for m in quantized)
    assert isinstance(model.lm_head, nn.Linear) and model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert linear_weight_bytes(qmodel) * 4 == linear_weight_bytes(model)
    assert qmodel.model.embed_tokens.weight.dtype == torch.float32 and not qmodel.training
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        quantize_int8(qmodel)


def test_logits_stay_close(model, qmodel):
    x = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, _ = model(x)
        got, _ = qmodel(x)
    close(ref, got)


def close(ref: torch.Tensor, got: torch.Tensor) -> None:
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
    p, q = ref.log_softmax(-1), got.log_softmax(-1)
    assert (p.exp() * (p - q)).sum(-1).mean() < 1e-3  # KL(fp32 || int8) per token, nats


def test_kv_cache_generation_works_quantized(model, qmodel, tok):
    x = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _ = qmodel(x)
        cache = KVCache(qmodel.cfg, 2, 20)
        steps = [qmodel(x[:, :8], kv_cache=cache)[0]] + [qmodel(x[:, t : t + 1], kv_cache=cache)[0]
                                                         for t in range(8, 20)]
    close(full, torch.cat(steps, 1))
    prompt = tok.encode("ROMEO:")
    assert len(qmodel.generate([prompt], 12, temperature=0)[0]) == 12  # Transformer.generate on the int8 model
    out = Engine(qmodel, tok).generate([GenRequest(prompt, 12, temperature=0, logprobs=True, ignore_eos=True),
                                        GenRequest(tok.encode("To be"), 5, temperature=0.8, seed=1)])
    assert len(out[0].token_ids) == 12 and out[0].text == tok.decode(out[0].token_ids)
    ids = torch.tensor([prompt + out[0].token_ids])
    with torch.no_grad():
        logits, _ = qmodel(ids[:, :-1])
    expected = logits[0, len(prompt) - 1 :].log_softmax(-1).gather(1, ids[0, len(prompt) :, None]).squeeze(1)
    assert out[0].logprobs == pytest.approx(expected.tolist(), abs=0.05)
