"""lm.compress.prune: unstructured sparsity hits its target, structured pruning shrinks the model and,
when the pruned heads / channels were already zero, gives the unpruned model's logits exactly; the KV
cache, generation and the Hugging Face reader still work; a fine-tune keeps zeros at zero; the model
directory round-trips (local folder and S3); `lm prune` reports bad requests (exit 2)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.cli import main as lm_main
from lm.compress.prune import PruneError, block_linears, prune_dir, prune_model
from lm.config import Config, ModelConfig, StorageConfig, TrainConfig, join_uri
from lm.data.loader import shard_bytes
from lm.model import KVCache, Transformer
from lm.modeldir import config_from_hf, hf_config, load_model_dir, save_model, save_model_dir
from lm.storage import ObjectStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GEN = torch.Generator
CORPUS = Path(__file__).parents[2] / "lm" / "corpora" / "tinyshakespeare.txt.gz"


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer


def model_of(tok, **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 48, "max_seq_len": 64,
                         "vocab_size": tok.vocab_size, "init_std": 0.1, **kw})
    return Transformer(cfg).eval()


def tokens(model, shape=(3, 20), seed=1) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, shape, generator=GEN().manual_seed(seed))


def assert_cache_matches_forward(model: Transformer) -> None:
    x = tokens(model, (2, 16), seed=7)
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.cfg, 2, 16)
        steps = [model(x[:, :6], kv_cache=cache)[0]] + [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(6, 16)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


# ----------------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_unstructured_reaches_the_target_and_removes_the_smallest_weights(tok, scope):
    model = model_of(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune_model(model, 0.4, "unstructured", scope=scope)
    pruned, report = result.model, result.report
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model changed"
    assert (report["actual_sparsity"] == pytest.approx(0.4, abs=1e-3)
            and report["params_after"] == report["params_before"])
    kept, removed = [], []
    for name, module in block_linears(pruned):
        w, orig = module.weight, before[name + ".weight"]
        assert not hasattr(module, "weight_mask") and not hasattr(module, "weight_orig")  # permanent
        assert torch.equal(w[w != 0], orig[w != 0]), "kept weights must keep their values"
        if scope == "matrix":
            assert (w == 0).float().mean().item() == pytest.approx(0.4, abs=0.01)
            assert orig[w == 0].abs().max() <= orig[w != 0].abs().min()
        kept.append(orig[w != 0].abs())
        removed.append(orig[w == 0].abs())
    if scope == "global":  # one threshold over every matrix
        assert torch.cat(removed).max() <= torch.cat(kept).min()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.equal(pruned.state_dict()[name], before[name])
    assert_cache_matches_forward(pruned)


def test_sparsity_zero_keeps_the_model(tok):
    model = model_of(tok, n_kv_heads=2)
    x = tokens(model)
    for method in ("unstructured", "heads", "channels"):
        result = prune_model(model, 0.0, method)
        assert result.model.cfg == model.cfg and result.report["actual_sparsity"] == 0
        assert torch.equal(result.model(x)[0], model(x)[0])


# ------------------------------------------------------------------------------------- structured


def zero_heads(model: Transformer, heads_per_layer: list[list[int]], with_kv: bool) -> None:
    hd = model.cfg.head_dim
    with torch.no_grad():
        for layer, heads in zip(model.model.layers, heads_per_layer, strict=True):
            for h in heads:
                rows = slice(h * hd, (h + 1) * hd)
                layer.self_attn.q_proj.weight[rows] = 0
                layer.self_attn.o_proj.weight[:, rows] = 0
                if with_kv:
                    layer.self_attn.k_proj.weight[rows] = 0
                    layer.self_attn.v_proj.weight[rows] = 0


@pytest.mark.parametrize(("n_kv_heads", "sparsity", "zeroed", "kept"), [
    (None, 0.25, [[2], [0]], [[0, 1, 3], [1, 2, 3]]),  # plain MHA: whole heads go
    (None, 0.5, [[0, 3], [1, 2]], [[1, 2], [0, 3]]),
    (2, 0.5, [[1, 2], [0, 3]], [[0, 3], [1, 2]]),  # GQA, 2 groups of 2: one query head per group
])
def test_heads_shrink_the_model_and_zeroed_heads_change_nothing(tok, n_kv_heads, sparsity, zeroed, kept):
    model = model_of(tok, n_kv_heads=n_kv_heads)
    zero_heads(model, zeroed, with_kv=n_kv_heads is None)
    result = prune_model(model, sparsity, "heads")
    pruned, cfg, hd = result.model, result.model.cfg, model.cfg.head_dim
    assert result.report["kept_heads"] == kept
    assert cfg.n_heads == len(kept[0]) and cfg.head_dim == hd == 8 and cfg.n_heads * hd < cfg.d_model
    assert cfg.kv_heads == (cfg.n_heads if n_kv_heads is None else 2)
    attn = pruned.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (cfg.n_heads * hd, 32) and attn.o_proj.weight.shape == (32, cfg.n_heads * hd)
    assert attn.k_proj.weight.shape == (cfg.kv_heads * hd, 32)
    assert pruned.num_parameters() < model.num_parameters()
    x = tokens(model)
    with torch.no_grad():
        assert (pruned(x)[0] - model(x)[0]).abs().max() < 1e-5
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    assert pruned.generate(prompts, 12, temperature=0) == model.generate(prompts, 12, temperature=0)
    assert_cache_matches_forward(pruned)


def test_channels_shrink_the_mlp_and_zeroed_channels_change_nothing(tok):
    model = model_of(tok, n_kv_heads=2)
    dead = [[0, 5, 17, 40], [3, 4, 30, 47]]
    with torch.no_grad():
        for layer, channels in zip(model.model.layers, dead, strict=True):
            layer.mlp.gate_proj.weight[channels] = 0
            layer.mlp.up_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[:, channels] = 0
    result = prune_model(model, 4 / 48, "channels")
    pruned = result.model
    assert pruned.cfg.ff_dim == 44 and result.report["d_ff_after"] == 44
    assert pruned.model.layers[1].mlp.down_proj.weight.shape == (32, 44)
    x = tokens(model)
    with torch.no_grad():
        assert (pruned(x)[0] - model(x)[0]).abs().max() < 1e-5
    assert pruned.generate([[4, 8, 15]], 10, temperature=0) == model.generate([[4, 8, 15]], 10, temperature=0)
    assert_cache_matches_forward(pruned)
    # the smallest-norm channels go: a live model drops the same count in every layer
    live = prune_model(model_of(tok), 0.5, "channels").model
    assert live.cfg.ff_dim == 24 and all(layer.mlp.up_proj.weight.shape == (24, 32) for layer in live.model.layers)


def test_impossible_structured_requests_name_the_culprit(tok):
    model = model_of(tok, n_kv_heads=2)
    with pytest.raises(PruneError, match=r"all 2 query heads in each of the 2 key/value groups"):
        prune_model(model, 0.8, "heads")
    with pytest.raises(PruneError, match=r"all 4 heads in each layer"):
        prune_model(model_of(tok), 0.9, "heads")
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(PruneError, match="sparsity"):
            prune_model(model, bad, "channels")
    with pytest.raises(PruneError, match="method 'rows'"):
        prune_model(model, 0.5, "rows")
    with pytest.raises(PruneError, match="scope 'layer'"):
        prune_model(model, 0.5, "unstructured", scope="layer")


def test_pruned_heads_config_round_trips_and_transformers_reads_it(tok, tmp_path):
    assert ModelConfig(d_model=32, n_heads=3, d_head=8).head_dim == 8  # 3 x 8 < 32 needs d_head
    with pytest.raises(ValueError, match="d_head"):
        ModelConfig(d_model=32, n_heads=3, d_head=7)
    pruned = prune_model(model_of(tok, n_kv_heads=2, tie_embeddings=False), 0.5, "heads").model
    assert config_from_hf(hf_config(pruned.cfg)) == pruned.cfg
    save_model(pruned, tmp_path)
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    x = tokens(pruned)
    with torch.no_grad():
        assert (hf(x).logits - pruned(x)[0]).abs().max() < 1e-4


# ------------------------------------------------------------------------- directories, fine-tune


def write_data(store: ObjectStore, data: str, tok, write_manifest, seq_len: int = 32) -> None:
    """A data folder in lm.data.pipeline's layout (manifest + Parquet shards) from the bundled corpus."""
    ids = tok.encode(gzip.decompress(CORPUS.read_bytes()).decode()[:20_000])
    rows = np.asarray(ids[: len(ids) // (seq_len + 1) * (seq_len + 1)], dtype=np.int32).reshape(-1, seq_len + 1)
    shards = []
    for split, part in (("train", rows[:-8]), ("val", rows[-8:])):
        store.write_bytes(join_uri(data, f"{split}.parquet"), shard_bytes(part))
        shards.append({"path": f"{split}.parquet", "split": split, "rows": len(part)})
    write_manifest(store, data, shards, tok, seq_len, "text")


def test_prune_dir_fine_tunes_with_zeros_kept_and_round_trips(tok, store_root, write_manifest):
    store, root = store_root.store, store_root.uri
    data, src, dst = join_uri(root, "data"), join_uri(root, "base"), join_uri(root, "pruned")
    write_data(store, data, tok, write_manifest)
    base = model_of(tok)
    cfg = Config(storage=StorageConfig(root=root), train=TrainConfig(
        trainer="local", device="cpu", batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=0, log_interval=1))
    save_model_dir(store, src, base, tok, cfg.generate, {"data_manifest": join_uri(data, "manifest.json"), "steps": 9})
    report = prune_dir(store, src, dst, 0.5, "unstructured", finetune_steps=3, cfg=cfg, log=lambda _: None)
    assert report["finetune"]["steps"] == 3 and report["finetune"]["data"] == data
    assert report["actual_sparsity"] == pytest.approx(0.5, abs=1e-3)
    loaded = load_model_dir(store, dst)
    assert loaded.lineage["pruned_from"] == src and loaded.lineage["steps"] == 9
    assert loaded.lineage["pruning"]["method"] == "unstructured" and loaded.lineage["pruning"]["finetune"]["steps"] == 3
    untuned = prune_model(base, 0.5, "unstructured").model
    moved = 0
    for (name, tuned), (_, plain) in zip(block_linears(loaded.model), block_linears(untuned), strict=True):
        assert torch.equal(tuned.weight == 0, plain.weight == 0), f"{name}: fine-tuning moved a pruned weight"
        moved += int((tuned.weight != plain.weight).sum())
    assert moved > 0, "the fine-tune did not train"
    heads = prune_dir(store, src, join_uri(root, "heads"), 0.5, "heads", cfg=cfg, log=lambda _: None)
    again = load_model_dir(store, heads["uri"]).model
    assert again.cfg.n_heads == 2 and again.cfg.head_dim == 8 and "finetune" not in heads
    x = tokens(again)
    assert torch.equal(again(x)[0], prune_model(base, 0.5, "heads").model(x)[0])
    # a fine-tune that distils the pruned model from the unpruned one (train.distill.teacher)
    taught = cfg.model_copy(update={"train": TrainConfig(**{**cfg.train.model_dump(), "distill": {"teacher": src}})})
    report = prune_dir(store, src, join_uri(root, "channels"), 0.25, "channels", finetune_steps=2, cfg=taught,
                       log=lambda _: None)
    assert report["finetune"]["teacher"] == src and report["d_ff_after"] == 36
    assert load_model_dir(store, report["uri"]).model.cfg.ff_dim == 36


def test_lm_prune_cli(tok, tmp_path, capsys):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    src = str(tmp_path / "base")
    save_model_dir(store, src, model_of(tok), tok, Config().generate, {})
    common = ["--model", src, "--out", str(tmp_path / "out"), f"storage.root={tmp_path}"]
    assert lm_main(["prune", *common, "--sparsity", "0.25", "--method", "channels"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"→ {tmp_path / 'out'}")
    assert load_model_dir(store, str(tmp_path / "out")).model.cfg.ff_dim == 36
    for args, message in [
        (["--sparsity", "1", "--method", "heads"], "sparsity 1.0: must be a number in [0, 1)"),
        (["--sparsity", "0.9", "--method", "heads"], "would prune all 4 heads"),
        (["--sparsity", "0.5", "--method", "blocks"], "method 'blocks': unknown"),
        (["--sparsity", "0.5", "--method", "unstructured", "--scope", "rows"], "scope 'rows'"),
        (["--sparsity", "0.5", "--method", "heads", "--finetune-steps", "-1"], "finetune_steps -1"),
    ]:
        assert lm_main(["prune", *common, *args]) == 2
        assert message in capsys.readouterr().err
    missing = ["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o2"), f"storage.root={tmp_path}"]
    assert lm_main(["prune", *missing, "--sparsity", "0.5", "--method", "heads"]) == 2
    assert "no published model directory" in capsys.readouterr().err
    assert lm_main(["prune", "--model", src, "--out", src, "--sparsity", "0.5", "--method", "heads"]) == 2
    assert "must differ from --model" in capsys.readouterr().err
