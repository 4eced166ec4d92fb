"""One DeepSpeed engine from our config: the model, AdamW (or Muon + AdamW) with decay/no-decay groups, our
schedule;
and :func:`build_cpu_ops`, which compiles DeepSpeed's CPU ops ahead of the first run.

    engine = initialize_engine(model, cfg.train, seq_len=cfg.seq_len, world=1, on_gpu=False)

Shared by the Ray Train worker loop (lm.train.loop) and the GPU benchmark (jobs/bench/gpu.py, which
runs without Ray); needs ``torch.distributed`` initialised (Ray Train does it; alone, call
``deepspeed.init_distributed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lm.config import TrainConfig
from lm.train.ds_config import deepspeed_config
from lm.train.optim import lr_scale, param_groups


def initialize_engine(model: torch.nn.Module, tc: TrainConfig, *, seq_len: int, world: int, on_gpu: bool,
                      universal: bool = False, clock: Callable[[], float] = lambda: 0.0) -> Any:
    """``deepspeed.initialize`` with lm.train.ds_config's config; every parameter group's learning rate
    follows :func:`lm.train.optim.lr_scale` of its peak (a LambdaLR DeepSpeed steps and checkpoints; ``clock``:
    the training seconds so far, for ``schedule_unit: seconds``); ``train.compile`` compiles the model through
    the engine. ``universal``: its ``load_checkpoint`` reads a universal checkpoint (lm.train.resume)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, tc.weight_decay),
        config=deepspeed_config(tc, seq_len=seq_len, world=world, on_gpu=on_gpu, universal=universal),
        lr_scheduler=lambda optimizer: LambdaLR(optimizer, lambda step: lr_scale(step, tc, clock())),
    )
    if tc.compile:  # compiles the module in place: parameter names and checkpoints are unchanged
        engine.compile(compile_kwargs={} if tc.compile_mode == "default" else {"mode": tc.compile_mode})
    return engine


def build_cpu_ops(log=print) -> list[str]:
    """Compile DeepSpeed's CPU ops now (CPU Adam for ``train.offload_optimizer``, the shared-memory
    collectives every CPU worker loads) instead of inside the first run; ``make install`` calls this.
    They land in ``TORCH_EXTENSIONS_DIR`` and are reused while the Python environment stays the same.
    A no-op list where DeepSpeed's accelerator is not the CPU (GPU machines build their own ops)."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return []
    built = []
    for name in ("CPUAdamBuilder", "ShareMemCommBuilder"):
        accelerator.create_op_builder(name).load(verbose=False)
        built.append(name)
        log(f"deepspeed op ready: {name}")
    return built
