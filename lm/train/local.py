"""A plain single-process training loop (no Ray, no DeepSpeed): the demo's first trainer and the
reference the distributed trainer is checked against.

    result = train_local(cfg, model, train_stream(store, data, cfg.train), val_rows)   # lm.data.stream
    result = train_local(cfg, model, rows, val_rows)      # rows in memory: [N, seq_len + 1] packed tokens
    result.history  # [{"step", "loss", "lr", "val_loss"?, "tokens_per_s"}, ...]

With ``teacher`` (a frozen model, lm.train.distill.load_teacher) the loss is the distillation loss of
``train.distill`` (cross-entropy mixed with the KL divergence to the teacher's logits), and the logged
records add ``distill_ce`` and ``distill_kl``; validation loss stays the plain cross-entropy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from lm.config import Config
from lm.data.pack import rows_to_inputs_targets
from lm.data.stream import ArraySplit, RowStream
from lm.train.distill import distill_loss, teacher_logits
from lm.train.optim import build_adamw, lr_at


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def to_inputs_targets(batch: np.ndarray, device: torch.device, mask: np.ndarray | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows → (inputs, targets) on ``device``; targets under a 0 of ``mask`` (a prompt) get no loss."""
    rows = torch.from_numpy(batch.astype(np.int64))
    inputs, targets = rows_to_inputs_targets(rows, None if mask is None else torch.from_numpy(mask))
    return inputs.to(device), targets.to(device)


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def estimate_loss(model, rows: np.ndarray, cfg: Config, device: torch.device, mask: np.ndarray | None = None) -> float:
    """Mean loss over the first ``eval_batches`` batches of ``rows`` (the same rows every time)."""
    was_training = model.training
    model.eval()
    bs = cfg.train.batch_size
    losses = []
    for i in range(0, min(len(rows), bs * cfg.train.eval_batches), bs):
        x, y = to_inputs_targets(rows[i : i + bs], device, None if mask is None else mask[i : i + bs])
        with autocast_for(cfg.train.precision, device):
            _, loss = model(x, y)
        losses.append(loss.item())
    model.train(was_training)
    return float(np.mean(losses))


def train_local(
    cfg: Config,
    model: torch.nn.Module,
    train_rows: np.ndarray | RowStream,
    val_rows: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    train_mask: np.ndarray | None = None,
    val_mask: np.ndarray | None = None,
    teacher: torch.nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place with AdamW and ``train.schedule`` for ``max_steps`` (or ``max_seconds`` of
    training time).
    ``train_rows``: a stream (lm.data.stream; closed at the end) or rows in memory; ``*_mask``: loss
    masks of in-memory rows; ``teacher``: distil from it (on the training device, see the module docstring)."""
    if isinstance(train_rows, np.ndarray):
        if len(train_rows) < 1:
            raise ValueError("no training rows")
        train_rows = RowStream(ArraySplit(train_rows, train_mask), cfg.train.seed, 0, 1, cfg.train.shuffle_window_rows)
    with train_rows:
        return _train(cfg, model, train_rows, val_rows, log, val_mask, teacher)


def _train(cfg: Config, model: torch.nn.Module, stream: RowStream, val_rows: np.ndarray | None,
           log: Callable[[str], None], val_mask: np.ndarray | None, teacher: torch.nn.Module | None) -> TrainResult:
    tc = cfg.train
    device = pick_device(tc.device)
    model.to(device).train()
    torch.manual_seed(tc.seed)
    optimizer = build_adamw(model, tc)
    result = TrainResult()
    start = last_log = time.perf_counter()
    tokens_since_log, train_s = 0, 0.0  # train_s: the steps' own time (the schedule's clock; no evaluation)
    for step in range(tc.max_steps):
        step_start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc, train_s)
        rows, mask = stream.next_rows(tc.batch_size)
        x, y = to_inputs_targets(rows, device, mask)
        with autocast_for(tc.precision, device):
            logits, loss = model(x, y)
            if teacher is not None:
                parts = distill_loss(logits, teacher_logits(teacher, x), y, temperature=tc.distill.temperature,
                                     weight=tc.distill.weight)
                loss = parts.loss
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps, result.tokens = step + 1, result.tokens + x.numel()
        tokens_since_log += x.numel()
        elapsed = time.perf_counter() - start
        train_s += time.perf_counter() - step_start
        last = step + 1 == tc.max_steps or (tc.max_seconds is not None and train_s >= tc.max_seconds)
        if (step + 1) % tc.log_interval == 0 or step == 0 or last:
            now = time.perf_counter()
            record = {"step": step + 1, "loss": loss.item(), "lr": optimizer.param_groups[0]["lr"],
                      "tokens_per_s": tokens_since_log / max(now - last_log, 1e-9), "elapsed_s": elapsed}
            if teacher is not None:
                record.update(distill_ce=parts.ce.item(), distill_kl=parts.kl.item())
            if val_rows is not None and len(val_rows) and ((step + 1) % tc.eval_interval == 0 or last):
                record["val_loss"] = estimate_loss(model, val_rows, cfg, device, val_mask)
            result.history.append(record)
            val = f" val {record['val_loss']:.4f}" if "val_loss" in record else ""
            log(f"step {step + 1:>5}/{tc.max_steps} loss {record['loss']:.4f}{val} "
                f"lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s")
            last_log, tokens_since_log = time.perf_counter(), 0
        if last:
            break
    result.seconds = time.perf_counter() - start
    return result
