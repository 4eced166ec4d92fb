"""The Ray Train worker loop: one DeepSpeed engine per worker, checkpoints and metrics via ``ray.train``.

:func:`train_worker` is what :class:`ray.train.torch.TorchTrainer` runs on every worker (lm.train.trainer
builds the trainer). Each worker:

* streams its share of the train split from storage (lm.data.stream: a few row groups in memory,
  read ahead in a thread; every worker runs the same number of micro-batches) and holds the fixed,
  bounded validation set (the first ``eval_batches x batch_size`` rows);
* builds the model (seeded, so identical everywhere) and ``deepspeed.initialize``s it with the config
  of lm.train.ds_config (ZeRO stage, offload, precision, accumulation, clipping, AdamW) and our
  warm-up + decay schedule;
* every ``log_interval`` steps: loss, lr, grad norm, tokens/s, MFU and memory (rank 0 prints them and
  writes TensorBoard events); every ``eval_interval`` steps: validation loss and bits per byte, a
  DeepSpeed checkpoint (+ RNG, history, a consolidated copy of the weights) reported to Ray Train, which
  uploads it in the background (training waits for the local save only: jobs/bench/checkpoint.py);
  what lmforge adds to a checkpoint holds no pickle (RNG and weights in safetensors, the state in JSON);
  DeepSpeed's own ``*_states.pt`` files are pickles, read back by its ``load_checkpoint`` (the storage
  must be writable only by the job: docs/cluster.md, "Trust boundary");
* at the end, rank 0 publishes the run (lm.train.publish): metrics, loss curve and the consolidated model
  directory at ``<run>/model``.

The worker's collaborators: lm.train.weights (the model it starts from, the consolidated weights),
lm.train.resume (what a checkpoint holds, writing and restoring it), lm.train.run_log (history, progress lines,
TensorBoard), lm.train.publish; :class:`Worker` keeps the set-up, the step and the evaluation.

With ``train.distill.teacher`` every worker also holds the frozen teacher (lm.train.distill) and
trains on its distillation loss; ``distill_ce`` / ``distill_kl`` join the logged metrics.

Resume: from ``ray.train.get_checkpoint()`` (a restarted worker group, or a re-run of the same run):
model, optimizer (Adam moments), scheduler, step, RNG and the data position (lm.data.stream.StreamPosition)
come back, so the curve goes on as if never stopped; on another number of workers too, through DeepSpeed's
universal checkpoint, converted once and cached next to the checkpoint (lm.train.resume, which also says
what happens to each rank's RNG and data when the count changes).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lm.cluster import accelerator
from lm.config import Config, join_uri
from lm.data.manifest import read_manifest
from lm.data.stream import train_stream, validation_rows
from lm.model import flops_per_token
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.distill import distill_loss, load_teacher, teacher_logits
from lm.train.engine import initialize_engine
from lm.train.levers import checkpoint_blocks, prepare_levers
from lm.train.local import to_inputs_targets
from lm.train.optim import EarlyStopping
from lm.train.peak import device_peak, worker_share
from lm.train.publish import RunFacts, publish_run
from lm.train.resume import Resume, TrainerState, checkpoint_uri, restore, restore_rng, write_checkpoint
from lm.train.run_log import RunLog, say
from lm.train.weights import build_model, consolidated_weights, load_init_weights


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _all_mean(values: list[float], world: int) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return (t / world).tolist()


class Worker:
    """The state of one training worker (see the module docstring)."""

    def __init__(self, cfg: Config, store: ObjectStore | None = None):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        autos = "auto" in (cfg.train.zero_stage, cfg.train.activation_checkpointing)
        cfg, self.memory_plan = prepare_levers(cfg, self.world, self.device)  # autos resolved alike on every rank
        if autos and self.rank == 0:
            say(f"memory plan: {self.memory_plan.describe(cfg.model.n_layers)}")
        self.cfg, self.tc = cfg, cfg.train
        self.store = store or ObjectStore(cfg.storage)
        self.data = cfg.data_uri
        self.manifest = read_manifest(self.store, self.data)
        self.tok = BPETokenizer.from_json(self.store.read_text(self.manifest.tokenizer_uri(self.data)))
        self.val_rows, self.val_mask = validation_rows(self.store, self.data, self.tc)
        self.tokens_per_byte = self.manifest.tokens_per_byte("val")
        distill = self.tc.distill  # the teacher is checked (tokenizer, context) before the model is built
        self.teacher = (load_teacher(self.store, distill.teacher, self.tok, cfg.seq_len, self.tc.precision, self.device)
                        if distill.teacher else None)
        self.distill_parts = (0.0, 0.0)  # the last step's cross-entropy and KL terms
        self.loss_kernel = "torch" if self.teacher is not None else self.tc.loss_kernel  # distillation reads logits
        self.model = build_model(cfg, self.tok.vocab_size)
        checkpoint = ray.train.get_checkpoint()
        if self.tc.init_from and checkpoint is None:  # a resumed run continues from its own checkpoint
            load_init_weights(self.model, self.store, self.tc.init_from)
        checkpoint_blocks(self.model, self.memory_plan.recomputed)
        self.step = 0
        self.stopping = EarlyStopping(self.tc.early_stopping_patience)
        peak = device_peak(self.device, self.tc.peak_flops)  # one fixed number (lm.train.peak), not a timing
        self.peak, self.peak_source = worker_share(peak, self.device, self.tc.cpus_per_worker), peak.source
        self.train_s = 0.0  # training time so far (the steps' own, all ranks agreeing; schedule_unit: seconds)
        self.flops_per_token = flops_per_token(self.model.cfg, cfg.seq_len)
        self.engine, history = self._engine(checkpoint)
        self.accum = self.engine.gradient_accumulation_steps()
        timed = self.tc.max_seconds if self.tc.schedule_unit == "seconds" else None  # the ETA: by time or by steps
        self.log = RunLog(self.rank, self.tc.max_steps, history, timed)  # history; rank 0: lines, TensorBoard

    # ------------------------------------------------------------------------------ set-up and resume

    def _engine(self, checkpoint) -> tuple[Any, list[dict[str, Any]]]:
        """The DeepSpeed engine, with everything a checkpoint holds restored (lm.train.resume), and the
        checkpoint's history ([] for a fresh run)."""
        tc = self.tc
        with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
            source = None if checkpoint is None else Resume(
                folder=Path(folder), uri=checkpoint_uri(self.store, self.cfg.run_uri, checkpoint.path),
                state=TrainerState.read(Path(folder)), world=self.world, zero_stage=tc.zero_stage)
            state = source.state if source else None
            self.stream = train_stream(self.store, self.data, tc, self.rank, self.world, state and state.data,
                                       micro_batches=tc.grad_accum(self.cfg.seq_len, self.world))
            universal = source is not None and source.mode == "universal"
            if state is not None:
                self.train_s = state.train_seconds
            engine = initialize_engine(self.model, tc, seq_len=self.cfg.seq_len, world=self.world,
                                       on_gpu=self.device.type == "cuda", universal=universal,
                                       clock=lambda: self.train_s)
            if source is not None:
                restore(engine, source, self.store, self.rank)
            restore_rng(source and source.folder, self.rank, tc.seed, state.step if state else 0)
            if state is not None:
                self.step = state.step
                self.stopping = EarlyStopping(tc.early_stopping_patience, state.best, state.bad_evals)
                if self.rank == 0:
                    say(f"resumed at step {self.step} {source.describe()}{self._batch_change(state)}")
        return engine, state.history if state else []

    def _tokens_per_step(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum(self.cfg.seq_len, self.world) * self.world * self.cfg.seq_len

    def _batch_change(self, state: TrainerState) -> str:
        """A note when the global batch is not the checkpoint's (no ``train.global_batch_tokens``)."""
        if state.tokens_per_step in (None, self._tokens_per_step()):
            return ""
        return (f"; global batch {state.tokens_per_step} → {self._tokens_per_step()} tokens "
                "(set train.global_batch_tokens)")

    # ------------------------------------------------------------------------------------- the loop

    def run(self) -> None:
        tc = self.tc
        start = time.perf_counter()
        last_time, last_step = start, self.step
        stop_after = min(tc.max_steps, tc.stop_after_steps or tc.max_steps)
        self.engine.train()
        while self.step < stop_after:
            step_start = time.perf_counter()
            self.lr = self._adamw_lr()  # what this step runs with (the schedule set it at the last one)
            loss = self._train_step()
            self.step += 1
            self.train_s += self._agreed_seconds(time.perf_counter() - step_start)
            out_of_time = tc.max_seconds is not None and self.train_s >= tc.max_seconds
            last = self.step >= stop_after or out_of_time
            record: dict[str, Any] = {}
            if self.step % tc.log_interval == 0 or self.step == 1 or last:
                now = time.perf_counter()
                record = self._train_metrics(loss, (self.step - last_step) / max(now - last_time, 1e-9))
                last_time, last_step = now, self.step
            if self.step % tc.eval_interval == 0 or last:
                record = record or self._train_metrics(loss, None)
                record.update(self._evaluate())
                early = "val_loss" in record and self.stopping.update(record["val_loss"])
                self.log.add(record)
                self._report(record)
                if early:
                    if self.rank == 0:
                        say(f"early stop: no better validation loss for {self.stopping.bad_evals} evaluations")
                    break
            elif record:
                self.log.add(record)
            if last:
                break
        self._finish()

    def _train_step(self) -> float:
        total, ce, kl, distill = 0.0, 0.0, 0.0, self.tc.distill
        for _ in range(self.accum):
            rows, mask = self.stream.next_rows(self.tc.batch_size)
            x, y = to_inputs_targets(rows, self.device, mask)
            logits, loss = self.engine(x, y, loss_kernel=self.loss_kernel)
            if self.teacher is not None:
                parts = distill_loss(logits, teacher_logits(self.teacher, x), y, temperature=distill.temperature,
                                     weight=distill.weight)
                loss, ce, kl = parts.loss, ce + parts.ce.item(), kl + parts.kl.item()
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        self.distill_parts = (ce / self.accum, kl / self.accum)
        return total / self.accum

    def _adamw_lr(self) -> float:
        """The learning rate of the AdamW parameters (with Muon, the matrices have muon_lr's)."""
        groups = self.engine.optimizer.param_groups
        return next((g["lr"] for g in groups if not g.get("use_muon")), groups[0]["lr"])

    def _agreed_seconds(self, seconds: float) -> float:
        """A step's time as every rank counts it (the slowest rank's), so that a time-based schedule and
        max_seconds give every rank the same learning rate and the same last step."""
        if self.world == 1 or (self.tc.max_seconds is None and self.tc.schedule_unit == "steps"):
            return seconds
        import torch.distributed as dist

        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def _train_metrics(self, loss: float, steps_per_s: float | None) -> dict[str, Any]:
        loss_mean = _all_mean([loss], self.world)[0]
        record: dict[str, Any] = {"step": self.step, "loss": loss_mean, "lr": self.lr, "train_s": self.train_s,
                                  "workers": self.world, "global_batch_tokens": self._tokens_per_step()}
        if self.teacher is not None:
            record["distill_ce"], record["distill_kl"] = _all_mean(list(self.distill_parts), self.world)
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            record["grad_norm"] = float(norm)
        if steps_per_s is not None:
            tokens_per_s = steps_per_s * self.tc.batch_size * self.accum * self.world * self.cfg.seq_len
            record["tokens_per_s"] = tokens_per_s
            record["model_gflops"] = tokens_per_s * self.flops_per_token / 1e9  # all workers together
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.world)
        record["memory_mib"] = memory_mib(self.device)
        return record

    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Validation loss over ``eval_batches`` micro-batches split across ranks (every rank runs the
        same number of forwards, which ZeRO-3's parameter gathering needs)."""
        if self.val_rows is None or not len(self.val_rows):
            return {}
        micro = self.tc.batch_size
        n_batches = max(1, len(self.val_rows) // micro)
        per_rank = math.ceil(min(self.tc.eval_batches, n_batches) / self.world)
        self.engine.eval()
        losses = []
        for i in range(per_rank):
            b = (self.rank + i * self.world) % n_batches
            part = slice(b * micro, (b + 1) * micro)
            x, y = to_inputs_targets(self.val_rows[part], self.device,
                                     None if self.val_mask is None else self.val_mask[part])
            losses.append(self.engine(x, y)[1].item())
        self.engine.train()
        val_loss = _all_mean([float(np.mean(losses))], self.world)[0]
        out = {"val_loss": val_loss}
        if self.tokens_per_byte:
            out["val_bpb"] = val_loss / math.log(2) * self.tokens_per_byte
        return out

    # ------------------------------------------------------------------------- checkpoints and output

    def _report(self, record: dict[str, Any]) -> None:
        """A checkpoint (lm.train.resume.write_checkpoint) reported to Ray Train with the record's metrics; Ray
        uploads it in the background while training goes on (jobs/bench/checkpoint.py). The seconds training
        waited go into the record."""
        import shutil

        import ray.train

        state = TrainerState(step=self.step, best=self.stopping.best, bad_evals=self.stopping.bad_evals,
                             world_size=self.world, history=self.log.history, data=self.stream.position(),
                             tokens_per_step=self._tokens_per_step(), train_seconds=self.train_s)
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="lm-ckpt-")  # Ray deletes it once uploaded (the default with ASYNC)
        try:
            weights = consolidated_weights(self.engine, self.tc.zero_stage, self.rank)
            save_s = write_checkpoint(self.engine, Path(tmp), self.rank, state, weights)
            self.log.upload(self.store, join_uri(self.cfg.run_uri, "train", "tensorboard"))
            metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
            reporting = time.perf_counter()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        now = time.perf_counter()  # into this checkpoint's own history record (the one the log holds)
        record.update(checkpoint_s=now - start, checkpoint_save_s=save_s, checkpoint_report_s=now - reporting)

    def _finish(self) -> None:
        """Rank 0 publishes the run (lm.train.publish); under ZeRO-3 every rank helps gather the weights."""
        weights = consolidated_weights(self.engine, self.tc.zero_stage, self.rank)
        self.stream.close()
        if self.rank != 0:
            return
        model = build_model(self.cfg, self.tok.vocab_size)
        model.load_state_dict(weights, strict=False)
        self.log.upload(self.store, join_uri(self.cfg.run_uri, "train", "tensorboard"), close=True)
        facts = RunFacts(tokens=self.step * self._tokens_per_step(), trainer="ray+deepspeed", workers=self.world,
                         zero_stage=self.tc.zero_stage,
                         data_position=self.stream.position().model_dump(mode="json", exclude={"plan"}))
        publish_run(self.store, self.cfg, model, self.tok, self.manifest, self.log.history, facts)


def train_worker(config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: ``config = {"cfg": Config, "store": ObjectStore}``
    (the driver's store, so credentials resolved from its environment reach the workers)."""
    os.environ["DS_ACCELERATOR"] = accelerator()
    Worker(config["cfg"], config.get("store")).run()
