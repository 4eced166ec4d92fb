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
  must be writable only by the job: README, "Trust boundary");
* at the end, rank 0 publishes the consolidated model directory (lm.modeldir) at ``<run>/model``.

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
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from lm.config import Config, join_uri
from lm.data.manifest import read_manifest
from lm.data.stream import train_stream, validation_rows
from lm.model import Transformer, flops_per_token
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.distill import distill_loss, load_teacher, teacher_logits
from lm.train.distill import lineage as distill_lineage
from lm.train.engine import initialize_engine
from lm.train.local import to_inputs_targets
from lm.train.optim import EarlyStopping
from lm.train.peak import device_peak, worker_share
from lm.train.resume import TAG, Resume, TrainerState, checkpoint_uri, restore, restore_rng
from lm.train.rng import save_rng_state

WEIGHTS = "consolidated.safetensors"  # the full weights of every checkpoint (no longer needed to resume)


def build_model(cfg: Config, vocab_size: int) -> Transformer:
    """The model of ``cfg`` (embedding rows: at least the tokenizer's vocabulary), seeded."""
    torch.manual_seed(cfg.train.seed)
    return Transformer(cfg.model.model_copy(update={"vocab_size": max(cfg.model.vocab_size, vocab_size)}))


def load_init_weights(model: Transformer, store: ObjectStore, uri: str) -> None:
    """``train.init_from``: start from a model directory's weights (fine-tuning, continual learning).
    Every tensor must be there with this model's shape (same architecture and vocabulary)."""
    from lm.modeldir import load_model_dir

    source = load_model_dir(store, uri).model.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in source:
            raise ValueError(f"train.init_from={uri}: it has no {name}; it is not a model of this architecture")
        if source[name].shape != tensor.shape:
            raise ValueError(f"train.init_from={uri}: {name} is {tuple(source[name].shape)} there but "
                             f"{tuple(tensor.shape)} in this config's model (check model.* and the tokenizer)")
    model.load_state_dict(source)


def memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _say(line: str) -> None:
    """A progress line on stdout (once: Ray Train V2's patched ``print`` would also log it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


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

        self.cfg, self.tc = cfg, cfg.train
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
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
        self.model = build_model(cfg, self.tok.vocab_size)
        checkpoint = ray.train.get_checkpoint()
        if self.tc.init_from and checkpoint is None:  # a resumed run continues from its own checkpoint
            load_init_weights(self.model, self.store, self.tc.init_from)
        self.model.activation_checkpointing = self.tc.activation_checkpointing
        self.step, self.history = 0, []
        self.stopping = EarlyStopping(self.tc.early_stopping_patience)
        peak = device_peak(self.device, self.tc.peak_flops)  # one fixed number (lm.train.peak), not a timing
        self.peak, self.peak_source = worker_share(peak, self.device, self.tc.cpus_per_worker), peak.source
        self.train_s = 0.0  # training time so far (the steps' own, all ranks agreeing; schedule_unit: seconds)
        self.flops_per_token = flops_per_token(self.model.cfg, cfg.seq_len)
        self.engine = self._engine(checkpoint)
        self.accum = self.engine.gradient_accumulation_steps()
        self.writer = self._tensorboard()

    # ------------------------------------------------------------------------------ set-up and resume

    def _engine(self, checkpoint) -> Any:
        """The DeepSpeed engine, with everything a checkpoint holds restored (lm.train.resume)."""
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
                self.step, self.history = state.step, state.history
                self.stopping = EarlyStopping(tc.early_stopping_patience, state.best, state.bad_evals)
                if self.rank == 0:
                    _say(f"resumed at step {self.step} {source.describe()}{self._batch_change(state)}")
        return engine

    def _tokens_per_step(self) -> int:
        return self.tc.batch_size * self.tc.grad_accum(self.cfg.seq_len, self.world) * self.world * self.cfg.seq_len

    def _batch_change(self, state: TrainerState) -> str:
        """A note when the global batch is not the checkpoint's (no ``train.global_batch_tokens``)."""
        if state.tokens_per_step in (None, self._tokens_per_step()):
            return ""
        return f"; global batch {state.tokens_per_step} → {self._tokens_per_step()} tokens (set train.global_batch_tokens)"

    def _tensorboard(self):
        if self.rank != 0:
            return None
        from tensorboardX import SummaryWriter

        self.tb_dir = tempfile.mkdtemp(prefix="lm-tb-")
        return SummaryWriter(self.tb_dir)

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
                self._log(record)
                self._report(record)
                if early:
                    if self.rank == 0:
                        _say(f"early stop: no better validation loss for {self.stopping.bad_evals} evaluations")
                    break
            elif record:
                self._log(record)
            if last:
                break
        self._finish()

    def _train_step(self) -> float:
        total, ce, kl, distill = 0.0, 0.0, 0.0, self.tc.distill
        for _ in range(self.accum):
            rows, mask = self.stream.next_rows(self.tc.batch_size)
            x, y = to_inputs_targets(rows, self.device, mask)
            logits, loss = self.engine(x, y)
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

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.rank != 0:
            return
        for key, value in record.items():
            if key != "step":
                self.writer.add_scalar(f"train/{key}" if not key.startswith("val") else f"val/{key}", value, self.step)
        parts = [f"step {self.step:>5}/{self.tc.max_steps}", f"loss {record['loss']:.4f}"]
        if "val_loss" in record:
            parts.append(f"val {record['val_loss']:.4f}" + (f" ({record['val_bpb']:.3f} bpb)" if "val_bpb" in record else ""))
        if "distill_kl" in record:
            parts.append(f"kl {record['distill_kl']:.4f}")
        parts.append(f"lr {record['lr']:.2e}")
        if "grad_norm" in record:
            parts.append(f"gnorm {record['grad_norm']:.2f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s {record['model_gflops']:.1f} GFLOP/s "
                         f"MFU {record['mfu']:.1%}")
        parts.append(f"{record['memory_mib']:,.0f} MiB")
        _say(" ".join(parts))

    # ------------------------------------------------------------------------- checkpoints and output

    def _weights(self) -> dict[str, torch.Tensor] | None:
        """The full state dict on rank 0 (None elsewhere); a collective under ZeRO-3."""
        if self.tc.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage

    def _report(self, record: dict[str, Any]) -> None:
        import shutil

        import ray.train

        state = TrainerState(step=self.step, best=self.stopping.best, bad_evals=self.stopping.bad_evals,
                             world_size=self.world, history=self.history, data=self.stream.position(),
                             tokens_per_step=self._tokens_per_step(), train_seconds=self.train_s)
        start = time.perf_counter()
        tmp = tempfile.mkdtemp(prefix="lm-ckpt-")  # Ray deletes it once uploaded (the default with ASYNC)
        try:
            self.engine.save_checkpoint(tmp, tag=TAG)
            saved = time.perf_counter()
            save_rng_state(Path(tmp) / f"rng-{self.rank}.safetensors")
            weights = self._weights()
            if self.rank == 0:
                save_file(weights, str(Path(tmp) / WEIGHTS), metadata={"format": "pt"})
                state.write(Path(tmp))
                self.writer.flush()
                self.store.upload_dir(self.tb_dir, join_uri(self.cfg.run_uri, "train", "tensorboard"))
            metrics = {k: v for k, v in record.items() if isinstance(v, int | float)}
            reporting = time.perf_counter()
            # the upload runs in Ray's background thread while training goes on (jobs/bench/checkpoint.py)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # the seconds training waited, into this checkpoint's own history record (the one _log appended)
        now = time.perf_counter()
        record.update(checkpoint_s=now - start, checkpoint_save_s=saved - start, checkpoint_report_s=now - reporting)

    def _finish(self) -> None:
        from lm.modeldir import save_model_dir
        from lm.train.metrics import history_jsonl, loss_curve_png

        weights = self._weights()
        self.stream.close()
        if self.rank != 0:
            return
        model = build_model(self.cfg, self.tok.vocab_size)
        model.load_state_dict(weights, strict=False)
        train_uri = join_uri(self.cfg.run_uri, "train")
        self.store.write_text(join_uri(train_uri, "metrics.jsonl"), history_jsonl(self.history))
        self.store.write_bytes(join_uri(train_uri, "loss.png"), loss_curve_png(self.history, f"{self.cfg.name}: loss"))
        self.writer.close()
        self.store.upload_dir(self.tb_dir, join_uri(train_uri, "tensorboard"))
        last = self.history[-1]
        lineage = {"run": self.cfg.name, "config_hash": self.cfg.fingerprint(), "tokenizer_hash": self.tok.fingerprint(),
                   "data_manifest": join_uri(self.data, "manifest.json"),
                   "data_inputs": self.manifest.inputs_fingerprint, "steps": self.step,
                   "tokens": self.step * self.tc.batch_size * self.accum * self.world * self.cfg.seq_len,
                   "final_loss": last["loss"], "val_loss": last.get("val_loss"), "trainer": "ray+deepspeed",
                   "zero_stage": self.tc.zero_stage, "workers": self.world,
                   "data_position": self.stream.position().model_dump(mode="json", exclude={"plan"})}
        if distilled := distill_lineage(self.tc.distill):
            lineage["distill"] = distilled
        save_model_dir(self.store, join_uri(self.cfg.run_uri, "model"), model, self.tok, self.cfg.generate, lineage)


def train_worker(config: dict) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer: ``config = {"cfg": Config, "store": ObjectStore}``
    (the driver's store, so credentials resolved from its environment reach the workers)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    Worker(config["cfg"], config.get("store")).run()
