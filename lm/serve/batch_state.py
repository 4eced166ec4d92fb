"""The running batch's tensor state beside :class:`~lm.serve.engine.DecodeBatch`: each row's seeded
generator, the per-row sampling settings as [B] tensors, and merging two row sets' states (KV caches,
masks, positions, last logits) into one when requests join a running batch. No Ray, no HTTP."""

from __future__ import annotations

import torch

from lm.model import KVCache


def generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()  # CPU: the same draws whatever device the model is on
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def settings(rows: list, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature, top_k (huge = off) and top_p (2 = off) as [B] tensors."""
    temperature = torch.tensor([float(r.req.temperature) for r in rows], device=device)
    top_k = torch.tensor([r.req.top_k or 2**31 - 1 for r in rows], device=device)
    top_p = torch.tensor([r.req.top_p if r.req.top_p is not None and r.req.top_p < 1 else 2.0 for r in rows],
                         device=device)
    return temperature, top_k, top_p


@torch.inference_mode()
def merge(old: dict, new: dict, old_rows: list, new_rows: list) -> dict:
    """One state for both row sets: each side's cache columns right-aligned to the longer side (left
    padding, masked; leading columns no old row attends to any more dropped), room for every row's
    remaining tokens."""
    a, b = old["cache"], new["cache"]
    trim = int(old["mask"].any(dim=0).int().argmax())  # the first column some old row attends to
    a_len = a.length - trim
    cols = max(a_len, b.length)
    room = max(r.req.max_tokens - r.n_tokens for r in old_rows + new_rows)
    L, Ba, H, _, D = a.k.shape
    cache = KVCache.__new__(KVCache)
    cache.k = a.k.new_zeros((L, Ba + b.k.size(1), H, cols + room, D))
    cache.v = torch.zeros_like(cache.k)
    cache.max_len, cache.length = cols + room, cols
    cache.k[:, :Ba, :, cols - a_len : cols] = a.k[:, :, :, trim : a.length]
    cache.v[:, :Ba, :, cols - a_len : cols] = a.v[:, :, :, trim : a.length]
    cache.k[:, Ba:, :, cols - b.length : cols] = b.k[:, :, :, : b.length]
    cache.v[:, Ba:, :, cols - b.length : cols] = b.v[:, :, :, : b.length]
    pad = torch.nn.functional.pad
    mask = torch.cat([pad(old["mask"][:, trim:], (cols - a_len, 0)), pad(new["mask"], (cols - b.length, 0))])
    return {"logits": torch.cat([old["logits"], new["logits"]]), "mask": mask, "cache": cache,
            "padded": not bool(mask.all()), "pos": torch.cat([old["pos"], new["pos"]]),
            "settings": tuple(torch.cat(pair) for pair in zip(old["settings"], new["settings"], strict=True))}
