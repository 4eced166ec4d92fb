"""How a training step runs, applied by lm.train to the single-device model, which knows none of it:
activation checkpointing of chosen blocks, and the SDPA kernel attention may use. The ZeRO stage and the
number of recomputed blocks that fit the device come from lm.train.ds_config.fit_memory; the loss kernel
is a forward argument (lm.head_loss). Each leaves the loss unchanged (tests/unit/test_levers.py).

    cfg, plan = prepare_levers(cfg, world, device)   # autos resolved, model-independent settings applied
    checkpoint_blocks(model, plan.recomputed)        # before the engine wraps the model
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint

from lm.config import Config
from lm.model import Transformer
from lm.train.ds_config import MemoryPlan, fit_memory

BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
            "math": "MATH"}


def checkpoint_blocks(model: Transformer, count: int) -> None:
    """Recompute the first ``count`` blocks' activations in backward (each keeps only its input); blocks
    run as before without gradients (evaluation) or with a KV cache (generation)."""
    for block in list(model.model.layers)[:count]:
        block.forward = _recomputed(block.forward)


def _recomputed(forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(x, cos, sin, mask, cache, layer):
        if cache is not None or not torch.is_grad_enabled():
            return forward(x, cos, sin, mask, cache, layer)
        return torch.utils.checkpoint.checkpoint(forward, x, cos, sin, mask, None, layer, use_reentrant=False)

    return run


def use_attention_backend(name: str) -> None:
    """Let SDPA use only ``name``'s kernel (train.attention_backend) in this process; ``auto``: PyTorch's
    choice. A kernel that cannot run the call makes SDPA raise, instead of silently falling back."""
    if name == "auto":
        return
    import torch._functorch.config as functorch
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = functorch.enable_autograd_cache = False  # a cached graph may hold another kernel
    cuda = torch.backends.cuda
    wanted = BACKENDS[name]
    cuda.enable_flash_sdp(wanted == "FLASH_ATTENTION")
    cuda.enable_cudnn_sdp(wanted == "CUDNN_ATTENTION")
    cuda.enable_mem_efficient_sdp(wanted == "EFFICIENT_ATTENTION")
    cuda.enable_math_sdp(wanted == "MATH")


def device_memory_gb(device: torch.device) -> float | None:
    """The device's memory for fit_memory: a GPU's total; None on CPU (host memory is not planned)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return None


def prepare_levers(cfg: Config, world: int, device: torch.device) -> tuple[Config, MemoryPlan]:
    """``cfg`` with its autos resolved for ``world`` workers on ``device`` (lm.train.ds_config.fit_memory),
    the attention backend set, and the plan (ZeRO stage, recomputed blocks) to report and apply."""
    tc = cfg.train
    if tc.loss_kernel == "liger" and device.type != "cuda":
        raise ValueError("train.loss_kernel liger runs on GPU only (Triton): use chunked on CPU")
    if tc.attention_backend in ("cudnn", "efficient") and device.type != "cuda":
        raise ValueError(f"train.attention_backend {tc.attention_backend} is a GPU kernel: use flash or math on CPU")
    cfg, plan = fit_memory(cfg, world, device_memory_gb(device))
    use_attention_backend(tc.attention_backend)
    return cfg, plan
