"""The vocabulary projection's cross-entropy without the whole logits tensor (``train.loss_kernel``).

    loss = linear_cross_entropy(hidden, weight, targets, "chunked")   # hidden [N, d], weight [V, d], targets [N]

The plain way (``torch``) builds float32 logits [N, V] and keeps them for backward: at gpt2-124m's
32 x 1024 tokens and 50k vocabulary that is 6.6 GB, more than the whole model's activations. ``chunked``
takes the rows a chunk at a time and computes each chunk's gradients (softmax - one-hot) in the forward,
the method of Liger-Kernel's fused linear cross-entropy in plain torch (so it also runs on CPU); backward
only scales them. ``liger`` is Liger-Kernel's Triton kernel itself (GPU, the optional ``liger-kernel``
package). Both give the mean over the targets that are not IGNORE (-100), like ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lm.loss_mask import IGNORE

CHUNK_ROWS = 4096  # rows of logits alive at once: 4096 x 50k x 4 bytes = 0.8 GB at gpt2's vocabulary


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int) -> Tensor:
        """hidden [N, d], weight [V, d], targets [N] -> the mean loss (float32 scalar)."""
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        count = (targets != IGNORE).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]  # [n, d], [n]
            logits = (h @ weight.T).float()  # [n, V]
            keep = t != IGNORE
            picked = t.clamp(min=0)[:, None]  # [n, 1]
            lse = torch.logsumexp(logits, dim=-1)  # [n]
            total += ((lse - logits.gather(1, picked)[:, 0]) * keep).sum()
            if need_hidden or need_weight:
                grad = torch.exp(logits - lse[:, None])  # softmax [n, V], in place of the logits
                grad.scatter_add_(1, picked, -torch.ones_like(grad[:, :1]))
                grad = (grad * (keep[:, None] / count)).to(hidden.dtype)  # d loss / d logits
                if need_hidden:
                    grad_hidden[start:start + chunk] = grad @ weight  # [n, d]
                if need_weight:
                    grad_weight += (grad.T @ h).float()  # [V, d]
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.float()
        return (None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype), None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, kernel: str,
                         chunk: int = CHUNK_ROWS) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets`` (IGNORE rows left out), by ``kernel``:
    chunked or liger (see the module docstring). hidden [N, d], weight [V, d], targets [N]."""
    if kernel == "chunked":
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk)
    if kernel == "liger":
        if hidden.device.type != "cuda":
            raise ValueError("loss_kernel liger runs on GPU only (Triton); use chunked on CPU")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError as exc:
            raise ValueError("loss_kernel liger needs the liger-kernel package (pip install liger-kernel)") from exc
        return liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE)
    raise ValueError(f"unknown loss kernel {kernel!r}: torch, chunked or liger")
