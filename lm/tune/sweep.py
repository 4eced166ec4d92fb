"""A sweep: Ray Tune over the real training run of lm.train.trainer, driven by ``cfg.tune``.

    lm tune -c configs/tune/seed-grid.yaml              (or jobs/tune.py)
    lm tune -c configs/tune/seed-grid.yaml --resume     continue an interrupted sweep

Each trial is a function trainable (0.01 CPU) that sets its values in the config
(lm.config.with_overrides), then builds and fits the run's ``TorchTrainer`` with Tune's
``TuneReportCallback``: every evaluation the workers report (step, val_loss, val_bpb, ...) reaches
Tune, where ASHA (``time_attr = step``) stops weak trials at its rungs. (Ray 2.60 runs Train V2,
which refuses ``Tuner(trainer)``; this is its documented pattern.) Grid/random search use Ray's
variant generator, Bayesian search Optuna's TPE. Trials share the sweep's data shards, prepared once
before any trial, and each writes its training run under ``<run>/tune/trials/<trial id>/``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from lm.cluster import connect, verbose
from lm.config import Config, ConfigError, Dimension, join_uri, with_overrides
from lm.data.pipeline import inputs_fingerprint, prepare_data
from lm.data.sources import plan_files
from lm.progress import Log, log_file_line
from lm.storage import ObjectStore
from lm.tune.results import TrialRecord, best_config, config_yaml, curves_png, results_table, sweep_uris

EXPERIMENT = "sweep"  # Tune's experiment name under <run>/tune/ray


@dataclass
class SweepResult:
    table: Any  # pandas.DataFrame, best trial first
    best_params: dict[str, Any]
    best_value: float
    uris: dict[str, str]  # results, curves, best, ...

    @property
    def stopped_early(self) -> int:
        return int((self.table["ended"] == "stopped early").sum())


def search_space(space: dict[str, Dimension]) -> dict[str, Any]:
    """``cfg.tune.space`` as Ray Tune's search space (keys stay dotted config keys)."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[d.kind](list(d.value)) if d.kind in ("grid", "choice") else make[d.kind](d.value)
            for key, d in space.items()}


TRIAL_CPU = 0.01  # the trial function's own reservation (it only waits on its worker group)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial reserves at its largest: its worker group and the trial function itself. Both count:
    two 1-CPU trials do not fit 2 CPUs (the second's group waits for the first, and Ray Train reports a
    start-up timeout after 60 s)."""
    tc = cfg.train
    need = {"CPU": tc.max_workers * tc.cpus_per_worker + TRIAL_CPU}
    if tc.gpus_per_worker:
        need["GPU"] = tc.max_workers * tc.gpus_per_worker
    for name, amount in tc.resources_per_worker.items():
        need[name] = need.get(name, 0) + tc.max_workers * amount
    return need


def trials_at_once(cfg: Config, cluster: dict[str, float]) -> int:
    """``tune.max_concurrent_trials``, else as many trials as the cluster's resources fit. Without this
    limit the trial functions would hold the CPUs their own worker groups need (a deadlock)."""
    need = trial_resources(cfg)
    fits = min(math.floor(cluster.get(name, 0) / amount + 1e-9) for name, amount in need.items())
    if fits < 1:
        have = ", ".join(f"{k} {cluster.get(k, 0):g}" for k in need)
        raise ConfigError(f"one trial needs {need} (train.workers x per-worker resources) but the cluster has {have}")
    return cfg.tune.max_concurrent_trials or fits


def check_sweep(cfg: Config, store: ObjectStore) -> None:
    """Fail before any work: nothing to search, a metric never reported, or a value that changes the
    data (trials share one set of shards)."""
    tc = cfg.tune
    if not tc.space:
        raise ConfigError("tune.space is empty: give at least one dimension, e.g. train.lr: {grid: [1e-3, 1e-2]}")
    if tc.metric.startswith("val_") and cfg.data.val_fraction <= 0:
        raise ConfigError(f"tune.metric {tc.metric} needs a validation split: data.val_fraction is 0")
    files = plan_files(store, cfg.data)
    base = inputs_fingerprint(cfg, files)
    for key, dimension in tc.space.items():
        for value in dimension.candidates():
            if inputs_fingerprint(with_overrides(cfg, {key: value}), files) != base:
                raise ConfigError(f"tune.space.{key}: {value!r} changes the prepared data; every trial shares one "
                                  "set of shards, so search model/train settings (or run one sweep per data setting)")


def trial_config(base: Config, params: dict[str, Any], trial_id: str, trials_uri: str) -> Config:
    """The config one trial trains with: its values set, its run under ``trials_uri/<id>``, the sweep's data."""
    cfg = with_overrides(base, params, f"trial {trial_id}:")
    return cfg.model_copy(update={"name": f"{base.name}-{trial_id}", "output": join_uri(trials_uri, trial_id),
                                  "data": cfg.data.model_copy(update={"output": base.data_uri})})


def run_trial(params: dict[str, Any], *, base: Config, store: ObjectStore, trials_uri: str) -> None:
    """The trainable: one real training run, its evaluations reported to Tune as they happen."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from lm.train.trainer import train

    trial_id = tune.get_context().get_trial_id()
    train(trial_config(base, params, trial_id, trials_uri), store, log_file_line, callbacks=[TuneReportCallback()],
          prepare=False)


def _tuner(cfg: Config, store: ObjectStore, resume: bool, log: Log):
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tc, uris = cfg.tune, sweep_uris(cfg.run_uri)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=cfg, store=store, trials_uri=uris["trials"]), {"CPU": TRIAL_CPU})
    fs, path = store.pyarrow_filesystem(uris["ray"])
    experiment = f"{path.rstrip('/')}/{EXPERIMENT}"
    exists = tune.Tuner.can_restore(experiment, storage_filesystem=fs)
    if exists and resume:
        log(f"tune: resuming the sweep at {join_uri(uris['ray'], EXPERIMENT)}")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, storage_filesystem=fs)
    if exists:
        raise ConfigError(f"a sweep already exists at {join_uri(uris['ray'], EXPERIMENT)}: pass --resume to continue "
                          "it, or give the run another name")
    if tc.scheduler == "asha":
        from lm.tune.asha import FinishingASHA

        # a trial reaching max_t ends by itself; stopping it at its last report would kill it while it
        # publishes its model directory (stop_last_trials=False, and lm.tune.asha for the rung at max_t)
        scheduler = FinishingASHA(time_attr="step", max_t=cfg.train.max_steps,
                                  grace_period=tc.grace_period or cfg.train.eval_interval,
                                  reduction_factor=tc.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    if tc.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=tc.seed)
    else:
        search_alg = None
    concurrent = trials_at_once(cfg, connect().cluster_resources())
    limit = concurrent  # Tune wraps a searcher in a ConcurrencyLimiter
    if search_alg is None:  # Ray's variant generator takes the limit itself (and warns that Tune's is ignored)
        search_alg, limit = BasicVariantGenerator(random_state=tc.seed, max_concurrent=concurrent), None
    log(f"tune: {tc.search} search over {', '.join(tc.space)}; {tc.num_samples} samples, {concurrent} at once, "
        f"{tc.scheduler} on {tc.metric} ({tc.mode}) → {uris['tune']}")
    return tune.Tuner(
        trainable,
        param_space=search_space(tc.space),
        tune_config=tune.TuneConfig(metric=tc.metric, mode=tc.mode, num_samples=tc.num_samples, scheduler=scheduler,
                                    search_alg=search_alg, max_concurrent_trials=limit),
        run_config=tune.RunConfig(name=EXPERIMENT, storage_path=path, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  verbose=None if verbose() else 0),  # the progress line shows the trials
        # (Tune's newer output engine prints its experiment table and paths even at verbose 0: its older one not)
    )


def _records(grid, keys: list[str]) -> list[TrialRecord]:
    records = []
    for result in grid:
        frame = result.metrics_dataframe
        history = [] if frame is None else json.loads(frame.to_json(orient="records"))
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rstrip("/").rsplit("/", 1)[-1]
        params = {k: result.config.get(k) for k in keys}
        records.append(TrialRecord(trial_id, params, history, str(result.error) if result.error else None))
    return records


def tune(cfg: Config, store: ObjectStore | None = None, log: Log = print, resume: bool = False) -> SweepResult:
    """Run (or with ``resume`` continue) the sweep of ``cfg.tune``; write its results table, curves
    PNG and best config under ``<run>/tune/``."""
    cfg = cfg.with_absolute_paths()  # trials and their workers run in other directories
    store = store or ObjectStore(cfg.storage)
    check_sweep(cfg, store)
    prepare_data(cfg, store, log)  # once, before any trial
    connect()
    if not verbose():
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # read by the Tuner's fit in this process (see _tuner)
    grid = _tuner(cfg, store, resume, log).fit()
    tc, uris = cfg.tune, sweep_uris(cfg.run_uri)
    trials = _records(grid, list(tc.space))
    table = results_table(trials, tc.metric, tc.mode, cfg.train.max_steps)
    store.write_text(uris["results"], table.to_csv(index=False))
    store.write_bytes(uris["curves"], curves_png(trials, tc.metric, f"{cfg.name}: {tc.metric} per trial"))
    scored = [t for t in trials if t.best(tc.metric, tc.mode)]
    if not scored:
        raise RuntimeError(f"no trial reported {tc.metric}; see the trial errors in {uris['results']}")
    best = min(scored, key=lambda t: t.best(tc.metric, tc.mode)[tc.metric] * (1 if tc.mode == "min" else -1))
    best_value = best.best(tc.metric, tc.mode)[tc.metric]
    header = (f"The best trial ({best.trial_id}) of the sweep {cfg.name}: {tc.metric} {best_value:.4f}.\n"
              f"Train it: lm train -c best.yaml   (values: {json.dumps(best.params)})")
    store.write_text(uris["best"], config_yaml(best_config(cfg, best.params, cfg.data_uri), header))
    log(f"tune: {len(trials)} trials, best first:\n{table.to_string(index=False)}")
    log(f"tune: results → {uris['results']}; curves → {uris['curves']}; best config → {uris['best']}")
    return SweepResult(table, best.params, best_value, uris)
