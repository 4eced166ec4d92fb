"""Distributed training from config: a Ray Train ``TorchTrainer`` whose workers run DeepSpeed.

    lm train -c configs/shakespeare-cpu.yaml train.workers=2 train.zero_stage=2    (or jobs/train.py)

:func:`train` prepares the data if needed (lm.data.pipeline; a no-op when its manifest is current),
then fits a TorchTrainer running :func:`lm.train.loop.train_worker` with ScalingConfig, RunConfig
(storage ``<run>/train/ray`` on S3 or a folder), FailureConfig and CheckpointConfig (keep N, ranked
by validation loss) from ``cfg.train``. Running it again on the same run resumes from the last
checkpoint (Ray Train restores the run from its storage), also with another number of workers.
``train.workers: [min, max]`` gives an elastic group (``ScalingConfig(num_workers=(min, max))``): it
restarts smaller from the last checkpoint when workers are lost and larger when the cluster has room
(checked every ``train.elastic_resize_monitor_interval_s``), the global batch kept by gradient
accumulation (lm.train.loop sizes it by the live world size).

Outputs under ``<run>``: ``train/ray/`` (Ray Train checkpoints, each a DeepSpeed checkpoint),
``train/metrics.jsonl``, ``train/loss.png``, ``train/tensorboard/`` and the model directory ``model/``.
With ``train.distill.teacher`` the teacher is checked before the data and again before Ray Train starts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from lm.cluster import connect, verbose, worker_env
from lm.config import Config, join_uri
from lm.data.pipeline import prepare_data
from lm.environ import environment
from lm.progress import Log, display
from lm.storage import ObjectStore
from lm.train.distill import check_run_teacher
from lm.train.run_log import RUN_VAR

POLL_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass
class TrainSummary:
    model_uri: str
    steps: int
    seconds: float
    history: list[dict]
    best_checkpoint: str | None


def build_trainer(cfg: Config, store: ObjectStore, callbacks: Sequence = ()):
    """The TorchTrainer of ``cfg.train`` (no work starts until ``fit()``); ``callbacks`` are Ray Train
    callbacks (lm.tune passes Tune's report callback)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lm.train.loop import train_worker

    tc = cfg.train
    on_gpu = tc.gpus_per_worker > 0
    resources = {"CPU": tc.cpus_per_worker, **tc.resources_per_worker}
    if on_gpu:
        resources["GPU"] = tc.gpus_per_worker
    fs, path = store.pyarrow_filesystem(join_uri(cfg.run_uri, "train"))
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg, "store": store},  # the store carries resolved S3 settings and keys
        torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.workers if tc.elastic else tc.min_workers, use_gpu=on_gpu,
                                     resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=tc.elastic_resize_monitor_interval_s),
        run_config=RunConfig(
            name="ray",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute="val_loss",
                                               checkpoint_score_order="min"),
            worker_runtime_env={"env_vars": {**worker_env(), RUN_VAR: cfg.name}},  # RUN_VAR: progress records
            callbacks=list(callbacks),
            # Ray Train's own INFO lines (resources, worker group, every checkpoint's TrainingReport) go to
            # its log files in Ray's session folder, not the console, unless lm --verbose
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
        ),
    )


def _group(tc, seq_len: int) -> str:
    """The worker group in words: workers x sequences x accumulation (each allowed size, if elastic)."""
    sizes = [f"{w} workers x {tc.batch_size} sequences x {tc.grad_accum(seq_len, w)} accumulation"
             for w in tc.world_sizes()]
    return sizes[0] if len(sizes) == 1 else f"elastic group ({' | '.join(sizes)})"


def controller_settings(tc) -> dict[str, float | None]:
    """The Ray Train controller settings ``cfg.train`` gives (None: Ray's own, or the user's variable)."""
    return {POLL_VAR: tc.poll_interval_s, START_TIMEOUT_VAR: tc.worker_start_timeout_s}


def controller_env(settings: dict[str, float | None]):
    """Ray Train hands the driver's ``RAY_TRAIN_*`` variables to the controller it starts in ``fit()``: set
    the given ones (:func:`controller_settings`) for this fit only, then put the variables back."""
    return environment({name: str(value) for name, value in settings.items() if value is not None})


def train(cfg: Config, store: ObjectStore | None = None, log: Log = print, *, callbacks: Sequence = (),
          prepare: bool = True) -> TrainSummary:
    """Prepare data if needed (``prepare``), train as ``train.trainer`` says (ray: Ray Train + DeepSpeed;
    local: the plain loop in this process, lm.train.inprocess), publish ``<run>/model``."""
    cfg = cfg.with_absolute_paths()  # the workers run elsewhere: ./lmforge-store must mean this folder
    store = store or ObjectStore(cfg.storage)
    check_run_teacher(cfg, store)  # train.distill.teacher: a model directory with the context, before any work
    if prepare:
        prepare_data(cfg, store, log)
        check_run_teacher(cfg, store)  # and the prepared data's tokenizer, before the workers start
    if cfg.train.trainer == "local":
        from lm.train.inprocess import train_in_process

        model_uri, result = train_in_process(cfg, store, log)
        return TrainSummary(model_uri, result.steps, result.seconds, result.history, None)
    tc = cfg.train
    mfu = ""
    if tc.peak_flops is None and tc.gpus_per_worker == 0:  # calibrated here, once per machine, not in a worker
        import torch

        from lm.train.peak import device_peak

        peak = device_peak(torch.device("cpu"))
        mfu = f"; MFU against {peak.flops / 1e9:.0f} GFLOP/s ({peak.source})"
    log(f"train: {_group(tc, cfg.seq_len)}, ZeRO-{tc.zero_stage}, {tc.precision}, {tc.max_steps} steps → "
        f"{join_uri(cfg.run_uri, 'train')}{mfu}")
    connect()
    start = time.perf_counter()
    display().start(cfg.name)
    try:
        with controller_env(controller_settings(tc)):
            result = build_trainer(cfg, store, callbacks).fit()
    finally:
        display().finish()  # the progress bar of the workers' records (lm.driver_output) ends with the fit
    if result.error:
        raise result.error
    seconds = time.perf_counter() - start
    metrics = store.read_text(join_uri(cfg.run_uri, "train", "metrics.jsonl"))
    history = [json.loads(line) for line in metrics.splitlines()]
    scored = [(m.get("val_loss", float("inf")), c.path) for c, m in result.best_checkpoints or []]
    best = min(scored)[1] if scored else None
    model_uri = join_uri(cfg.run_uri, "model")
    log(f"train: {history[-1]['step']} steps in {seconds:.0f} s; loss {history[0]['loss']:.3f} → "
        f"{history[-1]['loss']:.3f}; model → {model_uri}")
    return TrainSummary(model_uri, history[-1]["step"], seconds, history, best)
