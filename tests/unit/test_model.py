"""lm.model (causality, KV cache, batched generation, overfitting, counts) and lm.modeldir's HF format."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lm.config import ConfigError, ModelConfig, load_config
from lm.model import KVCache, Transformer, flops_per_token, num_params
from lm.modeldir import config_from_hf, hf_config, load_model, save_model

VOCAB = 64


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, n_heads=4, d_model=32, vocab_size=VOCAB, max_seq_len=32, init_std=0.3)
    return ModelConfig(**{**base, **kw})


def make(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny(**kw)).eval()


def hf_names(cfg: ModelConfig) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(cfg.n_layers):
        names |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        names |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        names |= {f"model.layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
    return names if cfg.tie_embeddings else names | {"lm_head.weight"}


# ------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_causality(n_kv_heads):
    model = make(n_kv_heads=n_kv_heads)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    base, _ = model(x)
    assert base.dtype == torch.float32
    for t in (0, 5, 15):
        changed = x.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        logits, _ = model(changed)
        assert torch.allclose(logits[:, :t], base[:, :t], atol=1e-6, rtol=0), f"future token {t} leaked"
        assert (logits[:, t] - base[:, t]).abs().max() > 1e-3, f"token {t} did not affect its own position"


@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_kv_cache_decoding_matches_full_forward(n_kv_heads):
    """Prefill 5 tokens, a 3-token chunk, then one token at a time: max |diff| < 1e-4 (fp32)."""
    model = make(n_kv_heads=n_kv_heads)
    x = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(2))
    full, _ = model(x)
    cache = KVCache(model.cfg, 3, 20)
    chunks = [model(x[:, :5], kv_cache=cache)[0], model(x[:, 5:8], kv_cache=cache)[0]]
    chunks += [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(8, 20)]
    assert cache.length == 20
    assert (torch.cat(chunks, dim=1) - full).abs().max() < 1e-4
    with pytest.raises(ValueError, match="KV cache"):
        model(x[:, :1], kv_cache=cache)


def test_left_padding_matches_unpadded():
    """A left-padded row (mask + positions from the mask) gives the unpadded row's logits."""
    model = make(n_kv_heads=2)
    row = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    alone, _ = model(row)
    padded = torch.cat([torch.full((1, 4), 5), row], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 7])
    logits, _ = model(padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert torch.isfinite(logits).all()
    assert (logits[:, 4:] - alone).abs().max() < 1e-5


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(tiny(init_std=0.02)).train()
    batch = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(4))
    batch[:, 0] = torch.arange(4)  # distinct first tokens: every target is determined by its prefix
    x, y = batch[:, :-1], batch[:, 1:].clone()
    y[0, 0] = -100  # ignored target
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(200):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize(
    "kw",
    [{}, {"tie_embeddings": False}, {"n_kv_heads": 2}, {"n_kv_heads": 1, "tie_embeddings": False, "d_ff": 72},
     {"qk_norm": True, "n_kv_heads": 2}],
)
def test_num_params_matches_model(kw):
    model = make(**kw)
    assert num_params(model.cfg) == model.num_parameters()
    assert model.num_parameters() == sum(p.numel() for p in model.state_dict().values()) - (
        model.cfg.vocab_size * model.cfg.d_model if model.cfg.tie_embeddings else 0
    )


def test_flops_per_token_formula():
    cfg = tiny(n_kv_heads=2, tie_embeddings=True)
    d, L, T = cfg.d_model, cfg.n_layers, 16
    embed_and_norms = cfg.vocab_size * d + (2 * L + 1) * d
    n_matmul = num_params(cfg) - embed_and_norms + cfg.vocab_size * d  # lm_head counted though tied
    assert flops_per_token(cfg, T) == 6 * n_matmul + 12 * L * cfg.n_heads * cfg.head_dim * T
    assert flops_per_token(cfg, T) == flops_per_token(cfg.model_copy(update={"tie_embeddings": False}), T)


def test_init_is_documented_scheme():
    torch.manual_seed(0)
    model = Transformer(tiny(n_layers=8, d_model=128, init_std=0.02))
    layer = model.model.layers[0]
    assert abs(layer.self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(layer.mlp.down_proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert abs(layer.self_attn.o_proj.weight.std().item() - 0.02 / 4) < 0.0005
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ------------------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_by_one():
    model = make(n_kv_heads=2)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
    batched = model.generate(prompts, 20, temperature=0)
    alone = [model.generate([p], 20, temperature=0)[0] for p in prompts]
    assert batched == alone
    # capped so prompt + new tokens fit max_seq_len (32), per row
    assert [len(o) for o in batched] == [20, 20, 20, 32 - 15]


def test_generation_seed_top_k_and_greedy():
    model = make()
    prompts = [[1, 2, 3], [4, 5]]
    a = model.generate(prompts, 20, temperature=1.0, seed=7)
    assert a == model.generate(prompts, 20, temperature=1.0, seed=7)
    assert a != model.generate(prompts, 20, temperature=1.0, seed=8)
    greedy = model.generate(prompts, 20, temperature=0)
    assert model.generate(prompts, 20, temperature=1.0, top_k=1, seed=3) == greedy
    assert model.generate(prompts, 20, temperature=1.0, top_p=1e-6, seed=3) == greedy  # nucleus of one
    top3 = model.generate(prompts, 20, temperature=5.0, top_k=3, seed=1)
    assert top3 != greedy and all(len(o) == 20 for o in top3)


def test_eos_and_stop_hook_finish_rows():
    model = make()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = model.generate(prompts, 10, temperature=0)
    k = next(k for k in range(1, 10) if greedy[0][k] not in greedy[0][:k])
    eos = greedy[0][k]
    out = model.generate(prompts, 10, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][:k]  # eos ends the row and is not returned
    assert out[1] == (greedy[1][: greedy[1].index(eos)] if eos in greedy[1] else greedy[1])
    seen: list[tuple[int, list[int]]] = []

    def stop(row: int, new_ids: list[int]) -> bool:
        seen.append((row, list(new_ids)))
        return row == 1 and len(new_ids) == 4

    out = model.generate(prompts, 10, temperature=0, stop=stop)
    assert out == [greedy[0], greedy[1][:4]]  # the token that triggered the stop is kept
    assert (1, greedy[1][:4]) in seen and not any(r == 1 and len(ids) > 4 for r, ids in seen)


def test_generate_edge_cases_and_training_mode():
    model = make().train()
    assert model.generate([], 5) == []
    assert model.generate([[1]], 0) == [[]]
    assert len(model.generate([[1] * 32], 5)[0]) == 0  # prompt fills the context
    assert model.training  # restored after generate


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"prompts": [[1], []]}, r"prompts\[1\]"),
        ({"prompts": [[1] * 33]}, "max_seq_len"),
        ({"prompts": [[VOCAB]]}, "vocab_size"),
    ],
)
def test_invalid_generate_args(kwargs, name):
    model = make()
    args = {"prompts": [[1, 2]], "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=name):
        model.generate(args.pop("prompts"), args.pop("max_new_tokens"), **args)


# ------------------------------------------------------------------------------ the HF directory


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_roundtrip(tmp_path, tied):
    model = make(n_kv_heads=2, tie_embeddings=tied)
    save_model(model, tmp_path, extra_config={"eos_token_id": 0, "pad_token_id": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == hf_names(model.cfg)
        assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["eos_token_id"] == 0
    loaded = load_model(tmp_path)
    assert loaded.cfg == model.cfg and not loaded.training
    x = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(loaded(x)[0], model(x)[0])


def test_load_rejects_mismatched_keys(tmp_path):
    save_model(make(tie_embeddings=False), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*unexpected \['lm_head\.weight'\]"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match=r"model\.safetensors.*missing \['model\.layers\.2"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "d_ff": 72, "tie_embeddings": False, "dropout": 0.1},
                                {"qk_norm": True}, {"dropout": 0.1, "attention_dropout": 0.0},
                                {"activation": "relu2"}, {"logit_softcap": 15.0, "qk_norm": True}])
def test_hf_config_roundtrip(kw):
    cfg = tiny(rope_theta=500.0, norm_eps=1e-6, **kw)
    assert config_from_hf(hf_config(cfg)) == cfg
    assert hf_config(cfg)["attention_dropout"] == kw.get("attention_dropout", kw.get("dropout", 0.0))
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**hf_config(cfg), "mlp_bias": True})
    with pytest.raises(ValueError, match="vocab_size"):
        config_from_hf({k: v for k, v in hf_config(cfg).items() if k != "vocab_size"})


@pytest.mark.parametrize(("tied", "qk_norm", "activation"),
                         [(True, False, "silu"), (False, False, "silu"), (True, True, "silu"), (True, False, "relu2")],
                         ids=["llama-tied", "llama-untied", "qwen3-qk-norm", "llama-gated-relu2"])
def test_transformers_reads_saved_dir_with_equal_logits_and_greedy_text(tmp_path, tied, qk_norm, activation):
    """Each architecture option maps exactly onto a transformers class (Llama; Qwen3 for QK-norm; Llama's
    hidden_act relu2 for gated ReLU²): the same logits, also left-padded, and the same greedy continuation."""
    transformers = pytest.importorskip("transformers")
    model = make(n_kv_heads=2, tie_embeddings=tied, rope_theta=500.0, qk_norm=qk_norm, activation=activation)
    with torch.no_grad():  # norm gains off 1, so a norm applied in the wrong place (or not at all) shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name))))
    save_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    x = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ours, theirs = model(x)[0], hf(x).logits
        assert (ours - theirs).abs().max() < 1e-4
        greedy = hf.generate(x[:1, :5], max_new_tokens=12, do_sample=False, attention_mask=torch.ones(1, 5))
        assert greedy[0, 5:].tolist() == model.generate([x[0, :5].tolist()], 12, temperature=0)[0]
        # left-padded batch: same mask and positions on both sides, real positions compared
        mask = torch.ones_like(x)
        mask[1, :6] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ours = model(x, attention_mask=mask, position_ids=pos)[0]
        theirs = hf(x, attention_mask=mask, position_ids=pos).logits
        assert (ours - theirs)[mask.bool()].abs().max() < 1e-4


def test_attention_dropout_is_its_own_or_the_models():
    """model.attention_dropout drops attention weights (Llama's attention_dropout) whatever model.dropout
    says; null follows model.dropout."""
    torch.manual_seed(0)
    x = torch.randint(0, 64, (2, 8))
    only_attention = Transformer(tiny(dropout=0.0, attention_dropout=0.5)).train()
    assert not torch.equal(only_attention(x)[0], only_attention(x)[0])  # the attention weights' dropout acts
    assert torch.equal(only_attention.eval()(x)[0], only_attention(x)[0])
    assert Transformer(tiny(dropout=0.5, attention_dropout=0.0)).model.layers[0].self_attn.dropout == 0.0
    assert Transformer(tiny(dropout=0.5)).model.layers[0].self_attn.dropout == 0.5


def test_logit_softcap_bounds_logits_and_is_not_passed_off_as_llama(tmp_path):
    """model.logit_softcap caps the logits (c·tanh(z/c)); its directory reloads in lmforge with the cap, and
    transformers refuses it rather than load a Llama without the cap. Fused loss kernels are refused."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    capped = make(logit_softcap=0.5)
    x = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        logits = capped(x)[0]
        plain = Transformer(capped.cfg.model_copy(update={"logit_softcap": None}))
        plain.load_state_dict(capped.state_dict())
        assert logits.abs().max() <= 0.5 < plain(x)[0].abs().max()
        assert torch.allclose(logits, 0.5 * torch.tanh(plain(x)[0] / 0.5), atol=1e-6)
    save_model(capped, tmp_path)
    assert torch.equal(load_model(tmp_path)(x)[0], logits)
    with pytest.raises((ValueError, KeyError), match="lmforge-softcap"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loss_kernel torch"):
        capped(x, x, loss_kernel="chunked")
    with pytest.raises(ConfigError, match=r"logit_softcap needs train\.loss_kernel torch"):
        load_config(None, ["model.logit_softcap=30", "train.loss_kernel=chunked"])
