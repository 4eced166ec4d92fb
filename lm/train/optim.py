"""Optimizer parameter groups, the learning-rate schedule and early stopping, shared by
every training loop (the plain one in lm.train.local and the Ray Train + DeepSpeed one in lm.train.loop)."""

from __future__ import annotations

import math

import torch

from lm.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linears, embeddings), none on vectors (norm gains)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8
    )


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr`` over ``warmup_steps``, then (``cfg.schedule``) cosine or linear decay
    to ``min_lr`` at ``max_steps``, or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - progress * (cfg.lr - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


class EarlyStopping:
    """Tracks the best validation loss; ``update`` says when ``patience`` evaluations in a row have not
    improved on it (``patience=None``: never). State is plain numbers, so it goes into checkpoints."""

    def __init__(self, patience: int | None, best: float = math.inf, bad_evals: int = 0):
        self.patience, self.best, self.bad_evals = patience, best, bad_evals

    def update(self, val_loss: float) -> bool:
        if val_loss < self.best:
            self.best, self.bad_evals = val_loss, 0
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience
