"""The weights of a run: the model it starts from (built from the config, seeded; or a model directory's
weights, ``train.init_from``) and the consolidated weights of a DeepSpeed engine (for checkpoints and the
published model). Used by both trainers."""

from __future__ import annotations

from typing import Any

import torch

from lm.config import Config
from lm.model import Transformer
from lm.storage import ObjectStore


def build_model(cfg: Config, vocab_size: int) -> Transformer:
    """The model of ``cfg`` (embedding rows: at least the tokenizer's vocabulary), seeded."""
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model.model_copy(update={"vocab_size": max(cfg.model.vocab_size, vocab_size)}))


def load_init_weights(model: Transformer, store: ObjectStore, uri: str) -> None:
    """``train.init_from``: start from a model directory's weights (fine-tuning, continual learning).
    Every tensor must be there with this model's shape (same architecture and vocabulary)."""
    from lm.modeldir import load_model_dir

    source = load_model_dir(store, uri).model.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in source:
            raise ValueError(f"train.init_from={uri}: it has no {name}; it is not a model of this architecture")
        if source[name].shape != tensor.shape:
            raise ValueError(f"train.init_from={uri}: {name} is {tuple(source[name].shape)} there but "
                             f"{tuple(tensor.shape)} in this config's model (check model.* and the tokenizer)")
    model.load_state_dict(source)


def consolidated_weights(engine: Any, zero_stage: int, rank: int) -> dict[str, torch.Tensor] | None:
    """The full fp32 state dict of a DeepSpeed engine on rank 0 (None elsewhere); under ZeRO-3 a collective
    every rank must enter."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero_stage == 3 else engine.module.state_dict()
    if rank != 0:
        return None
    return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
