"""`lm tune` on the shared Ray cluster: a 4-trial grid on the tiny model, each trial a real Ray Train +
DeepSpeed run, interrupted (driver killed, a trial between its checkpoints) and resumed, that trial from its
own checkpoint; ASHA stops the hopeless trials early; the outputs exist; the best config trains."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import pytest
import yaml
from training import optimizer_counts, ray_train_processes

from lm.cli import main as lm_main
from lm.config import load_config
from lm.storage import ObjectStore
from lm.train.resume import TrainerState
from lm.tune.sweep import SweepResult, tune

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
SPACE = {"train.lr": {"grid": [0.01, 0.00002]}, "train.seed": {"grid": [1, 2]}}


OVERRIDES = ["name=sweep", "train.workers=1", "train.zero_stage=1", "train.max_steps=20", "train.warmup_steps=2",
             "train.eval_interval=10", "train.log_interval=10", "train.batch_size=16", "train.min_lr=0.00001",
             f"tune.space={json.dumps(SPACE)}", "tune.grace_period=10", "tune.reduction_factor=2",
             "train.poll_interval_s=1"]  # a trial's step-20 report waits >= 1 s for the controller to take step 10's


def tune_args(root: Path, data: str) -> list[str]:
    """`lm tune` arguments; the trials train on ``data``, the session's tiny shards (the same data config)."""
    return ["-c", str(REPO / "configs/tiny.yaml"), f"storage.root={root}", f"data.output={data}", *OVERRIDES]


def saved_trials(experiment: Path) -> dict[str, dict]:
    """Tune's newest saved experiment state (what `--resume` starts from): trial id -> status, config, ..."""
    for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
        try:
            return {t["trial_id"]: t for t in (json.loads(x[0]) for x in json.loads(state.read_text())["trial_data"])}
        except (json.JSONDecodeError, KeyError, OSError):  # being written
            return {}
    return {}


def committed(trial: Path) -> dict | None:
    """The latest checkpoint Ray Train has committed for a trial's run (its checkpoint manager's snapshot):
    ``checkpoint_dir_name`` and the reported ``metrics``; what a new run of the trial restores from."""
    try:
        snapshot = (trial / "train/ray/checkpoint_manager_snapshot.json").read_text()
        return json.loads(snapshot)["latest_checkpoint_result"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def candidates(experiment: Path) -> list[str]:
    """Once a trial has finished (in Tune's saved state): the unfinished trials with lr 0.01 (ASHA keeps them at
    the first rung)."""
    saved = saved_trials(experiment)
    if not any(t["status"] == "TERMINATED" for t in saved.values()):
        return []
    return [trial_id for trial_id, t in saved.items()
            if t["status"] != "TERMINATED" and t["config"]["train.lr"] == 0.01]


def caught(trials: Path, watched: list[str]) -> str | None:
    """The first of ``watched`` whose Ray Train run has a committed checkpoint before its last step."""
    return next((t for t in watched if (latest := committed(trials / t)) and latest["metrics"]["step"] < 20), None)


class Sweep(NamedTuple):
    cfg: Any
    result: SweepResult
    finished_before: dict[Path, float]  # metrics.jsonl of the trials finished before the kill -> mtime
    interrupted: tuple[str, TrainerState]  # the trial killed between checkpoints; its last committed one's state
    resumed_at: float  # when the resumed sweep started (time.time())


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_run, tmp_path_factory) -> Sweep:
    """The sweep, interrupted: `lm tune` runs as its own driver on the shared cluster and is killed
    (SIGKILL, its trials die with it) once a first trial has finished and another has a committed checkpoint at
    step 10 of 20 (that trial's Ray Train controller and worker are killed first, so that it commits nothing
    more: a run of 20 steps takes under a second here); `--resume` then completes it."""
    root = tmp_path_factory.mktemp("tune")
    args = tune_args(root, tiny_run.cfg.data_uri)
    trials, experiment = root / "runs/sweep/tune/trials", root / "runs/sweep/tune/ray/sweep"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    deadline = time.monotonic() + 600
    with (root / "first-driver.log").open("wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "lm.cli", "tune", *args], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
        try:
            watched, checked = [], 0.0
            while (trial_id := caught(trials, watched)) is None:
                assert driver.poll() is None, (root / "first-driver.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial finished, or none was caught between checkpoints"
                if time.monotonic() > checked + 1:  # Tune saves its state every few seconds
                    watched, checked = candidates(experiment), time.monotonic()
                time.sleep(0.02 if watched else 0.25)  # the controller commits the next checkpoint >= 1 s later
            for process in ray_train_processes():  # that trial's run commits nothing more
                process.kill()
        finally:
            driver.kill()
            driver.wait()
    latest = committed(trials / trial_id)
    assert latest["metrics"]["step"] == 10, latest  # the controller died before it committed step 20
    saved = TrainerState.read(trials / trial_id / "train/ray" / latest["checkpoint_dir_name"])
    finished_before = {p: p.stat().st_mtime for p in trials.glob("*/train/metrics.jsonl") if p.parts[-3] != trial_id}
    cfg = load_config(args[1], args[2:])
    resumed_at = time.time()
    return Sweep(cfg, tune(cfg, log=lambda _: None, resume=True), finished_before, (trial_id, saved), resumed_at)


def worker_outputs(since: float) -> list[str]:
    """What Ray's worker processes printed (``worker-*.out`` in the session's log folder: the tests' Ray runs
    with log_to_driver off), of the files written to after ``since``."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [p.read_text(errors="replace") for p in logs.glob("worker-*.out") if p.stat().st_mtime >= since]


def test_sweep_runs_every_trial_and_asha_stops_the_hopeless_ones(sweep):
    _cfg, result, *_ = sweep
    table = result.table
    assert len(table) == 4 and set(table["ended"]) <= {"finished", "stopped early"}
    assert result.stopped_early >= 1
    stopped = table[table["ended"] == "stopped early"]
    assert (stopped["last_step"] < 20).all()
    # lr 2e-5 barely learns: at least one such trial is cut at the first rung (which others are cut depends
    # on the order results reach ASHA: a rung keeps the better half of what it has seen so far)
    assert (stopped["train.lr"] == 0.00002).any()
    assert table.iloc[0]["train.lr"] == 0.01 and table.iloc[0]["ended"] == "finished"
    assert list(table["val_bpb"]) == sorted(table["val_bpb"])  # best first
    assert result.best_params["train.lr"] == 0.01 and result.best_value == table.iloc[0]["val_bpb"]


def test_sweep_writes_the_table_the_curves_and_each_trials_run(sweep):
    cfg, result, *_ = sweep
    store = ObjectStore(cfg.storage)
    table = pd.read_csv(Path(result.uris["results"]))
    assert list(table["trial_id"]) == list(result.table["trial_id"])
    assert store.read_bytes(result.uris["curves"]).startswith(b"\x89PNG")
    for row in table.itertuples():  # every trial trained for real under <run>/tune/trials/<id>
        trial = Path(result.uris["trials"]) / row.trial_id
        assert list((trial / "train/tensorboard").glob("events.out.tfevents.*"))  # uploaded at each evaluation
        assert list((trial / "train/ray").rglob("trainer_state.json"))  # its Ray Train checkpoints
        if row.ended == "finished":
            history = [json.loads(line) for line in store.read_text(f"{trial}/train/metrics.jsonl").splitlines()]
            assert history[0]["step"] == 1 and history[-1]["step"] == 20
            assert store.exists(f"{trial}/model/model.safetensors")


def test_best_config_is_a_ready_to_run_training_preset(sweep, tmp_path):
    _cfg, result, *_ = sweep
    text = Path(result.uris["best"]).read_text()
    assert text.startswith("# The best trial")
    preset = tmp_path / "best.yaml"
    preset.write_text(text)
    best = load_config(preset, ["train.trainer=local", "train.max_steps=12", "train.eval_interval=6"])
    assert best.train.lr == 0.01 and best.train.seed == result.best_params["train.seed"]
    assert best.name == "sweep-best" and not best.tune.space and yaml.safe_load(text)["data"]["output"]
    from lm.pipeline import run_main

    summary = run_main(best, log=lambda _: None)  # trains on the sweep's shards, no new data preparation
    assert summary["steps"] == 12 and summary["final_loss"] < summary["first_loss"]


def test_resume_completes_the_interrupted_sweep_without_retraining_finished_trials(sweep, capsys):
    cfg, result, finished_before, _interrupted, _resumed_at = sweep
    assert finished_before and len(result.table) == 4
    assert {p: p.stat().st_mtime for p in finished_before} == finished_before  # not trained again
    # a fresh start over an existing sweep is refused; --resume of a finished one runs nothing
    args = tune_args(Path(cfg.storage.root), cfg.data.output)
    assert lm_main(["tune", *args]) == 2
    assert "--resume" in capsys.readouterr().err
    assert lm_main(["tune", "--resume", *args]) == 0
    assert "4 trials" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in finished_before} == finished_before


def test_the_trial_killed_between_checkpoints_resumes_from_its_own_with_the_optimizer_state(sweep):
    """The interrupted trial's worker resumed its Ray Train run (the same folder) at step 10 on the same single
    worker; its history up to there is the checkpoint's (timings too: a run from scratch would measure anew),
    it trained steps 11-20 once, and Adam's step count, the LR schedule and the engine all stand at 20 (a
    resume of the weights alone would have Adam and the schedule at 10)."""
    cfg, result, _finished_before, (trial_id, saved), resumed_at = sweep
    assert saved.step == 10 and saved.world_size == 1
    outputs = [text for text in worker_outputs(resumed_at) if "resumed at step" in text]
    ended = result.table.set_index("trial_id").loc[trial_id, ["ended", "last_step"]].to_dict()
    anywhere = [line for text in worker_outputs(0) for line in text.splitlines() if "resumed at" in line]
    assert len(outputs) == 1, (ended, anywhere)  # no other trial had a checkpoint to resume from
    trial = Path(result.uris["trials"]) / trial_id
    history = [json.loads(line) for line in (trial / "train/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == [1, 10, 20]
    assert history[:2] == saved.history  # restored from the checkpoint, not trained again
    lines = outputs[0].splitlines()
    assert [line for line in lines if line.startswith("resumed at")] == ["resumed at step 10 exactly"]
    assert f"step    20/20 loss {history[2]['loss']:.4f}" in outputs[0]  # that worker trained this trial's curve
    assert not [line for line in lines if line.startswith(("step     1/", "step    10/"))]  # and only after step 10
    final = trial / "train/ray" / committed(trial)["checkpoint_dir_name"]
    assert TrainerState.read(final).step == 20
    assert optimizer_counts(ObjectStore(cfg.storage), str(final)) == ({20}, 20, 20)
    assert result.table.set_index("trial_id").loc[trial_id, "ended"] == "finished"
