"""What a Ray Train worker logs of its run: the history (every logged record, kept in checkpoints), and on
rank 0 the progress record on stdout (lm.progress: the driver draws it as its live progress line) and
TensorBoard events (uploaded to ``<run>/train/tensorboard``).

    log = RunLog(rank, max_steps)
    log.add(record)                              # history; rank 0: a line and TensorBoard scalars
    log.upload(store, uri)                       # rank 0: the events so far
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Any

from lm.progress import progress_message
from lm.storage import ObjectStore

RUN_VAR = "LMFORGE_RUN"  # the run's name in the workers' environment (lm.train.trainer sets it)


def say(line: str) -> None:
    """A progress line on stdout (once: Ray Train V2's patched ``print`` would also log it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def progress_line(record: dict[str, Any], max_steps: int) -> str:
    """One record as the line rank 0 prints: step, losses, lr, gradient norm, throughput, memory."""
    parts = [f"step {record['step']:>5}/{max_steps}", f"loss {record['loss']:.4f}"]
    if "val_loss" in record:
        bpb = f" ({record['val_bpb']:.3f} bpb)" if "val_bpb" in record else ""
        parts.append(f"val {record['val_loss']:.4f}{bpb}")
    if "distill_kl" in record:
        parts.append(f"kl {record['distill_kl']:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    if "grad_norm" in record:
        parts.append(f"gnorm {record['grad_norm']:.2f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s {record['model_gflops']:.1f} GFLOP/s "
                     f"MFU {record['mfu']:.1%}")
    parts.append(f"{record['memory_mib']:,.0f} MiB")
    return " ".join(parts)


def quiet_worker_logs() -> None:
    """Unless ``LMFORGE_VERBOSE``: Ray Train's "Reporting training result …" INFO line (one per checkpoint and
    rank, its whole repr) stays in the worker's log file. Its logger is named after its file, so
    ``LoggingConfig(log_level=...)``, which filters ``ray.train.*`` only, misses it."""
    if os.environ.get("LMFORGE_VERBOSE"):
        return
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


class RunLog:
    """The run's history on every rank; rank 0 also prints and writes TensorBoard events."""

    def __init__(self, rank: int, max_steps: int, history: list[dict[str, Any]] | None = None,
                 max_seconds: float | None = None):
        self.rank, self.max_steps, self.max_seconds = rank, max_steps, max_seconds
        self.run = os.environ.get(RUN_VAR, "run")
        self.history: list[dict[str, Any]] = list(history or [])
        self.writer, self.folder = None, None
        with contextlib.suppress(ImportError):  # not Ray Train V2
            quiet_worker_logs()
        if rank == 0:
            from tensorboardX import SummaryWriter

            self.folder = tempfile.mkdtemp(prefix="lm-tb-")
            self.writer = SummaryWriter(self.folder)

    def add(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"val/{key}" if key.startswith("val") else f"train/{key}", value, record["step"])
        total = self.expected_steps(record)
        say(progress_message(self.run, record, total, progress_line(record, total)))

    def expected_steps(self, record: dict[str, Any]) -> int:
        """The step the run ends at, for the progress line and its ETA: train.max_steps, or, for a schedule in
        seconds (``max_seconds`` given; its max_steps is out of reach), where max_seconds ends it at the rate so far."""
        if not (self.max_seconds and record.get("train_s")):
            return self.max_steps
        return max(record["step"], min(self.max_steps, round(record["step"] * self.max_seconds / record["train_s"])))

    def upload(self, store: ObjectStore, uri: str, *, close: bool = False) -> None:
        """Rank 0: flush (or close) the event files and copy them to ``uri``."""
        if self.writer is None:
            return
        if close:
            self.writer.close()
        else:
            self.writer.flush()
        store.upload_dir(self.folder, uri)
