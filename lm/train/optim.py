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


def schedule_progress(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """How far the schedule has gone, 0..1: by steps after warm-up, or (``schedule_unit: seconds``) by
    ``seconds`` of training time out of ``max_seconds``."""
    if cfg.schedule_unit == "seconds":
        return min(seconds / cfg.max_seconds, 1.0)
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    return min(max(step - cfg.warmup_steps, 0) / span, 1.0)


def lr_scale(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """The schedule as a fraction of the peak learning rate (``lr``, and ``muon_lr`` likewise): linear
    warm-up over ``warmup_steps``, then (``cfg.schedule``) cosine or linear decay to ``min_lr / lr``,
    constant, or wsd: stable, then a linear decay over the last ``decay_fraction``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress, floor = schedule_progress(step, cfg, seconds), cfg.min_lr / cfg.lr
    if cfg.schedule == "wsd":
        progress = max(progress - (1 - cfg.decay_fraction), 0.0) / cfg.decay_fraction
    if cfg.schedule in ("linear", "wsd"):
        return 1.0 - progress * (1.0 - floor)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1.0 - floor)


def lr_at(step: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """The AdamW learning rate of optimizer step ``step`` (0-based) after ``seconds`` of training time."""
    return cfg.lr * lr_scale(step, cfg, seconds)


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
