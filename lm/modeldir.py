"""The model directory: the one hand-off format between training, evaluation, registry and serving.

``config.json`` + ``model.safetensors`` (Hugging Face Llama layout, read by transformers and vLLM),
``tokenizer.json`` + ``tokenizer_config.json``, ``generation_config.json`` and lmforge's
``lineage.json`` (what made it). Published atomically through the storage layer, so a reader never
sees half a model.

    save_model_dir(store, f"{cfg.run_uri}/model", model, tokenizer, cfg.generate, lineage={...})
    loaded = load_model_dir(store, uri)      # .model, .tokenizer, .generation, .lineage
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lm.config import GenerateConfig, ModelConfig
from lm.model import Transformer
from lm.storage import ObjectStore, StorageError
from lm.tokenizer import BPETokenizer, tokenizer_config_json

# ---------------------------------------------------------------- config.json + model.safetensors

SOFTCAP_TYPE = "lmforge-softcap"  # model_type of a soft-capped model: no transformers class computes it


def hf_config(cfg: ModelConfig, *, bos_token_id=None, eos_token_id=None, pad_token_id=None,
              dtype: torch.dtype = torch.float32) -> dict:
    """``config.json`` for ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with ``qk_norm`` (Llama plus QK-norm),
    describing this model (both also read by vLLM). A soft-capped model (no such class) is lmforge's own type,
    which transformers refuses rather than load without its cap."""
    dtype_name = str(dtype).removeprefix("torch.")
    qwen3 = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    base_type = "qwen3" if cfg.qk_norm else "llama"
    capped = {"logit_softcap": cfg.logit_softcap, "base_model_type": base_type} if cfg.logit_softcap else {}
    return {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": SOFTCAP_TYPE if capped else base_type,
        **(qwen3 if cfg.qk_norm else {}),
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_attention_heads": cfg.n_heads,
        "num_hidden_layers": cfg.n_layers,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": cfg.activation,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attn_dropout,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "lmforge": {"dropout": cfg.dropout, "attention_dropout": cfg.attention_dropout, **capped},
    }


def config_from_hf(d: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a Llama (or Qwen3: QK-norm) ``config.json`` dict; unsupported features
    raise ValueError."""
    required = ["hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "max_position_embeddings", "vocab_size"]
    if absent := [k for k in required if k not in d]:
        raise ValueError(f"Llama config lacks {absent}")
    rope = d.get("rope_parameters") or {}
    ours = d.get("lmforge") or {}
    model_type = ours.get("base_model_type") if d.get("model_type") == SOFTCAP_TYPE else d.get("model_type", "llama")
    problems = [
        f"{key}={d.get(key)!r}"
        for key, ok in [
            ("model_type", model_type in ("llama", "qwen3")),
            ("use_sliding_window", not d.get("use_sliding_window")),
            ("hidden_act", d.get("hidden_act", "silu") in ("silu", "relu2")),
            ("attention_bias", not d.get("attention_bias")),
            ("mlp_bias", not d.get("mlp_bias")),
            ("rope_scaling", not d.get("rope_scaling")),
            ("rope_parameters", rope.get("rope_type", "default") == "default"),
            ("head_dim", d.get("head_dim") is None or (isinstance(d["head_dim"], int) and d["head_dim"] % 2 == 0)),
        ]
        if not ok
    ]
    if problems:
        raise ValueError(f"unsupported Llama config for lmforge's Transformer: {', '.join(problems)}")
    n_heads, d_model = d["num_attention_heads"], d["hidden_size"]
    n_kv = d.get("num_key_value_heads") or n_heads
    ff = d["intermediate_size"]
    head_dim = d.get("head_dim") or d_model // n_heads
    default_head_dim = d_model // n_heads if d_model % n_heads == 0 else None
    cfg = ModelConfig(
        d_head=None if head_dim == default_head_dim else head_dim,  # a pruned model: n_heads x head_dim < d_model
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=None if n_kv == n_heads else n_kv,
        d_model=d_model,
        max_seq_len=d["max_position_embeddings"],
        vocab_size=d["vocab_size"],
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
        norm_eps=d.get("rms_norm_eps", 1e-6),
        dropout=ours.get("dropout", 0.0),  # lmforge's own: null = as dropout (older ones)
        attention_dropout=ours.get("attention_dropout") if "lmforge" in d else d.get("attention_dropout", 0.0),
        tie_embeddings=d.get("tie_word_embeddings", False),
        qk_norm=model_type == "qwen3",
        activation=d.get("hidden_act", "silu"),
        logit_softcap=ours.get("logit_softcap"),
        init_std=d.get("initializer_range", 0.02),
    )
    return cfg if cfg.ff_dim == ff else cfg.model_copy(update={"d_ff": ff})


def save_model(model: Transformer, directory: Path, *, extra_config: dict | None = None) -> None:
    """Write ``config.json`` + ``model.safetensors`` (HF Llama names; tied lm_head left out)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = model.model.embed_tokens.weight.dtype
    config = {**hf_config(model.cfg, dtype=dtype), **(extra_config or {})}
    tensors = {
        name: t.detach().contiguous().cpu()
        for name, t in model.state_dict().items()
        if not (model.cfg.tie_embeddings and name == "lm_head.weight")
    }
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_model(directory: Path, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Read a directory written by :func:`save_model` (or a matching HF Llama one), in eval mode.

    ``dtype=None`` keeps the dtype stored in the file."""
    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a model directory needs config.json + model.safetensors)")
    cfg = config_from_hf(json.loads(config_path.read_text()))
    with torch.device(device):
        model = Transformer(cfg)
    expected = {k for k in model.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    state = load_file(str(weights_path), device=str(device))
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"{weights_path}: keys do not match the config: missing {missing}, unexpected {unexpected}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"{weights_path}: {err}") from None
    model.to(dtype or state["model.embed_tokens.weight"].dtype)
    return model.eval()


# ------------------------------------------------------------------ the whole directory, via storage


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: BPETokenizer
    generation: dict = field(default_factory=dict)
    lineage: dict = field(default_factory=dict)


def generation_config(gen: GenerateConfig, tokenizer: BPETokenizer) -> dict:
    """HF ``generation_config.json`` from lmforge's sampling defaults."""
    return {
        "bos_token_id": tokenizer.eos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
        "do_sample": gen.temperature > 0,
        "temperature": gen.temperature,
        "top_k": gen.top_k,
        "top_p": gen.top_p,
        "max_new_tokens": gen.max_new_tokens,
    }


def write_model_dir(
    directory: Path, model: Transformer, tokenizer: BPETokenizer, gen: GenerateConfig, lineage: dict
) -> None:
    """Write every file of a model directory into a local folder."""
    ids = {"bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    save_model(model, directory, extra_config=ids)
    tokenizer.save(directory / "tokenizer.json")
    (directory / "tokenizer_config.json").write_text(tokenizer_config_json(tokenizer, model.cfg.max_seq_len))
    (directory / "generation_config.json").write_text(json.dumps(generation_config(gen, tokenizer), indent=2))
    (directory / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True))


def save_model_dir(
    store: ObjectStore, uri: str, model: Transformer, tokenizer: BPETokenizer, gen: GenerateConfig, lineage: dict
) -> None:
    """Write a model directory locally, then publish it atomically at ``uri``."""
    with tempfile.TemporaryDirectory(prefix="lm-model-") as tmp:
        write_model_dir(Path(tmp), model, tokenizer, gen, lineage)
        store.publish_dir(tmp, uri)


def load_model_dir(store: ObjectStore, uri: str, device: str = "cpu") -> LoadedModel:
    """Load a published model directory from a local folder or object storage."""
    if not store.is_published(uri):
        raise StorageError(f"{uri}: no published model directory there (missing or incomplete)")
    with tempfile.TemporaryDirectory(prefix="lm-model-") as tmp:
        local = store.local_path(uri) or Path(tmp)
        if store.local_path(uri) is None:
            store.download_dir(uri, tmp)
        return LoadedModel(
            model=load_model(local, device=device),
            tokenizer=BPETokenizer.load(local / "tokenizer.json"),
            generation=_read_json(local / "generation_config.json"),
            lineage=_read_json(local / "lineage.json"),
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
