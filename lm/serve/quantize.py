"""Int8 dynamic quantization of a model's Linear layers, for CPU serving replicas.

It owns the one call that turns a float :class:`lm.model.Transformer` into one whose ``nn.Linear``
layers (attention q/k/v/o, the SwiGLU MLP, the lm_head) hold int8 weights and quantize their
activations on the fly (per tensor, per call); embeddings and norms stay float32, so the KV cache,
``Transformer.generate`` and lm.serve.engine work on the result unchanged.

    qmodel = quantize_int8(loaded.model)       # a new module; the float model is left as it was
    engine = Engine(qmodel, loaded.tokenizer)

It uses PyTorch's eager-mode ``torch.ao.quantization.quantize_dynamic`` (fbgemm / x86 kernels). In
PyTorch 2.13 that API still works but warns that it is deprecated in favour of torchao's
``quantize_`` (a separate package, not a dependency of lmforge); the warning is silenced here.
CPU only: quantized Linear kernels do not run on CUDA. Because activations are quantized with one
scale per call, a quantized model's output for a row depends slightly on the other rows of its batch.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from lm.model import Transformer


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of ``model`` (float, on the CPU) with int8 dynamically quantized Linear layers, in eval mode."""
    device = model.rope_cos.device
    if device.type != "cpu":
        raise ValueError(f"int8 dynamic quantization runs on the CPU only; the model is on {device}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError("the model has no nn.Linear layers to quantize (already quantized?)")
    float_model = copy.deepcopy(model).float().eval()
    head = nn.Linear(*reversed(float_model.lm_head.weight.shape), bias=False)  # lm.model.LMHead's plain form,
    head.weight = float_model.lm_head.weight  # which quantize_dynamic maps (it matches types exactly)
    float_model.lm_head = head
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*deprecated.*")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return quantized.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the Linear layers, float or int8-quantized (for size reports)."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QLinear):
            w = m.weight()
            total += w.numel() * w.element_size()
    return total
