"""Checkpoints of a Ray Train worker: what goes into one, and resuming from it, on the number of workers that
wrote it or on another.

    seconds = write_checkpoint(engine, folder, rank, state, weights)   # every rank; weights on rank 0
    source = Resume(folder=Path(local_copy), uri=checkpoint_uri(store, cfg.run_uri, checkpoint.path),
                    state=TrainerState.read(Path(local_copy)), world=world)
    engine = initialize_engine(model, tc, ..., universal=source.mode == "universal")
    restore(engine, source, store, rank)                # weights, Adam moments, step, LR schedule
    restore_rng(source.folder, rank, tc.seed, source.state.step)

A checkpoint is one of Ray Train's folders, ``<run>/train/ray/checkpoint_*`` (S3 or a folder).
:func:`write_checkpoint` puts into it DeepSpeed's checkpoint (tag ``state``: ZeRO shards, one set per rank),
each rank's RNG state (``rng-<rank>.safetensors``), :class:`TrainerState` (``trainer_state.json``) and the
consolidated weights.

**What comes back** (:attr:`Resume.mode`):

* ``exact``, the same number of workers: DeepSpeed's ``load_checkpoint``; every rank gets its own shards.
* ``universal``, another number of workers with ZeRO 1, 2 or 3 (optimizer offload too): ZeRO shards fit only
  the world size that wrote them, so the checkpoint is converted to DeepSpeed's universal checkpoint
  (``deepspeed.checkpoint.ds_to_universal``: per parameter its fp32 master weights, Adam ``exp_avg`` and
  ``exp_avg_sq`` and the step count, unsharded) and loaded with ``checkpoint.load_universal``. Weights,
  moments, step and LR schedule come back as saved; each new rank takes its share of every tensor.
* ``full``, another number of workers with ZeRO 0: every rank saved the whole optimizer state, which
  ``load_checkpoint`` reads at any world size.

**Conversion: once per checkpoint, at the first resume that needs it, cached in storage** as
``<checkpoint>/universal`` (published whole, with lm.storage's marker, so a copy cut short is never read;
inside the checkpoint, so Ray Train's retention deletes it with it). Rank 0 converts its local copy of the
checkpoint (Ray's ``as_directory``: a download from S3) and uploads the result; the other ranks wait at a
barrier, then every rank reads it (from S3: a download per rank). At resume rather than at save: a resume on
another world size is rare, and at save time no rank holds the other ranks' shards (Ray Train merges them in
storage after the report), so converting then would cost a download and a conversion at every checkpoint.

**Per-rank state when the count changes**:

* RNG: rank r restores ``rng-<r>`` when the checkpoint has it (r below the saved count); a rank beyond gets
  seeds derived from (``train.seed``, r, step) (:func:`lm.train.rng.seed_rank`, as every rank of a fresh run
  with step 0); the states of saved ranks beyond the new count are dropped.
* Data: the global row position carries over (lm.data.stream): on a world k times smaller whose
  accumulation is a multiple of k, each worker reads the saved ranks' pieces in turn, so every step reads the
  rows the larger world would have; otherwise the rows no worker had read yet are cut anew.
* Batch: ``train.global_batch_tokens`` keeps the global batch, gradient accumulation adjusting
  (lm.train.ds_config); without it the global batch scales with the number of workers, and the resume says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save_file

from lm.config import join_uri
from lm.data.stream import StreamPosition
from lm.storage import ObjectStore
from lm.train.rng import load_rng_state, save_rng_state, seed_rank

TAG = "state"  # the DeepSpeed checkpoint tag inside every Ray Train checkpoint
UNIVERSAL = "universal"  # its universal conversion, next to it (a DeepSpeed tag too)
STATE = "trainer_state.json"
WEIGHTS = "consolidated.safetensors"  # the full weights of every checkpoint (not needed to resume)
Mode = Literal["exact", "universal", "full"]


class TrainerState(BaseModel):
    """``trainer_state.json``: what a checkpoint keeps of the loop besides DeepSpeed's state (JSON, no pickle)."""

    model_config = ConfigDict(extra="forbid")

    step: int
    best: float = math.inf  # early stopping: the best validation loss so far
    bad_evals: int = 0
    world_size: int  # the workers that wrote the checkpoint
    history: list[dict[str, Any]] = []
    data: StreamPosition | None = None  # None: a checkpoint older than the streaming loader
    tokens_per_step: int | None = None  # the global batch in tokens (None: older checkpoints)
    train_seconds: float = 0.0  # training time so far (the clock of max_seconds and a time-based schedule)

    def write(self, folder: Path) -> None:
        (folder / STATE).write_text(json.dumps(self.model_dump()))  # json, not pydantic's: best may be inf

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        return cls.model_validate(json.loads((folder / STATE).read_text()))


def write_checkpoint(engine: Any, folder: Path, rank: int, state: TrainerState,
                     weights: dict[str, torch.Tensor] | None) -> float:
    """Into ``folder``: DeepSpeed's checkpoint (this rank's shards), this rank's RNG state, and on rank 0 the
    consolidated ``weights`` (safetensors) and the trainer state (JSON). The seconds DeepSpeed's save took."""
    start = time.perf_counter()
    engine.save_checkpoint(str(folder), tag=TAG)
    seconds = time.perf_counter() - start
    save_rng_state(folder / f"rng-{rank}.safetensors")
    if rank == 0:
        save_file(weights, str(folder / WEIGHTS), metadata={"format": "pt"})
        state.write(folder)
    return seconds


class Resume(BaseModel):
    """A checkpoint to resume from: its local copy, its URI in storage, its state, and the new world size."""

    model_config = ConfigDict(frozen=True)

    folder: Path
    uri: str
    state: TrainerState
    world: int
    zero_stage: int

    @property
    def mode(self) -> Mode:
        if self.state.world_size == self.world:
            return "exact"
        return "full" if self.zero_stage == 0 else "universal"

    def describe(self) -> str:
        """How it resumes, for the log line (``exactly`` on the same world: tests match on it)."""
        if self.mode == "exact":
            return "exactly"
        how = "universal checkpoint" if self.mode == "universal" else "full optimizer state"
        return f"on {self.world} worker{'s' * (self.world > 1)} instead of {self.state.world_size} ({how})"


def checkpoint_uri(store: ObjectStore, run_uri: str, checkpoint_path: str) -> str:
    """The storage URI of a Ray Train checkpoint of the run at ``run_uri``, from its path on Ray's
    filesystem (``checkpoint.path``), which lies under the one of ``<run>/train`` (lm.train.trainer)."""
    train_uri = join_uri(run_uri, "train")
    base = store.pyarrow_filesystem(train_uri)[1].rstrip("/")
    path = checkpoint_path.rstrip("/")
    if not path.startswith(base + "/"):
        raise ValueError(f"checkpoint {checkpoint_path} is not under this run's storage {base}")
    return join_uri(train_uri, path[len(base) + 1:])


def convert_to_universal(folder: Path, out: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` from the checkpoint in the local ``folder`` (its tag :data:`TAG`) into
    the new folder ``out`` (it writes ``latest_universal`` beside it). One process: no worker pool inside a
    Ray worker. ``--inject_missing_state``: lmforge's checkpoints carry no Megatron-style universal info."""
    from deepspeed.checkpoint import ds_to_universal

    argv, log = sys.argv, io.StringIO()
    sys.argv = ["ds_to_universal", "--input_folder", str(folder / TAG), "--output_folder", str(out),
                "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except Exception as err:
        raise RuntimeError(f"{folder}: converting to a universal checkpoint failed: {err}\n"
                           f"{log.getvalue()[-2000:]}") from err
    finally:
        sys.argv = argv


def ensure_universal(store: ObjectStore, source: Resume, rank: int) -> str:
    """The URI of the checkpoint's universal copy: rank 0 converts and publishes it unless a complete one is
    there already; every rank returns after it is (a barrier)."""
    target = join_uri(source.uri, UNIVERSAL)
    if rank == 0 and not store.is_published(target):
        with tempfile.TemporaryDirectory(prefix="lm-universal-") as tmp:
            convert_to_universal(source.folder, Path(tmp) / UNIVERSAL)
            store.publish_dir(Path(tmp) / UNIVERSAL, target)
    _barrier(source.world)
    return target


@contextlib.contextmanager
def local_copy(store: ObjectStore, uri: str) -> Iterator[Path]:
    """The folder at ``uri`` on this machine: itself on a local store, else a download removed afterwards."""
    path = store.local_path(uri)
    if path is not None:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="lm-universal-") as tmp:
        yield store.download_dir(uri, Path(tmp) / Path(uri.rstrip("/")).name)


def restore(engine: Any, source: Resume, store: ObjectStore, rank: int) -> None:
    """Load weights, optimizer state, step and schedule into ``engine``, built with ``universal=True`` when
    ``source.mode`` is ``universal`` (lm.train.engine)."""
    if source.mode != "universal":
        loaded, _ = engine.load_checkpoint(str(source.folder), tag=TAG)
    else:
        decay = [group["weight_decay"] for group in engine.optimizer.param_groups]
        with local_copy(store, ensure_universal(store, source, rank)) as path:
            loaded, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        _mend_zero3_universal_load(engine, decay)
    if loaded is None:
        raise RuntimeError(f"{source.uri}: DeepSpeed found no checkpoint to load ({source.mode})")


def _mend_zero3_universal_load(engine: Any, decay: list[float]) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal load (a no-op after stages 1 and 2), each of which
    put a resumed ZeRO-3 curve up to 9e-4 off the uninterrupted one within 10 steps (the test's runs):

    * every parameter group gets the first group's settings: the norms, which have no weight decay
      (lm.train.optim.param_groups), would be decayed; ``decay`` is each group's, as the engine was built;
    * every group's state gets one shared ``step`` tensor, which torch's AdamW increments in place once per
      group and step: the bias correction of all but the first group would run ahead.
    """
    import torch

    for group, value in zip(engine.optimizer.param_groups, decay, strict=True):
        group["weight_decay"] = value
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def restore_rng(folder: Path | None, rank: int, seed: int, step: int) -> bool:
    """This rank's saved RNG state if ``folder`` has it (True), else seeds from (seed, rank, step) (False)."""
    saved = folder / f"rng-{rank}.safetensors" if folder is not None else None
    if saved is not None and saved.exists():  # a checkpoint older than this format kept a pickle: not read
        load_rng_state(saved)
        return True
    seed_rank(seed, rank, step)
    return False


def _barrier(world: int) -> None:
    import torch.distributed as dist

    if world > 1 and dist.is_initialized():
        dist.barrier()
