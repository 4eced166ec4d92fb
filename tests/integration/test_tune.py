"""`lm tune` on the shared Ray cluster: a 4-trial grid on the tiny model, each trial a real Ray Train +
DeepSpeed run, interrupted (driver killed) and resumed; ASHA stops the hopeless trials early; the
outputs exist; the best config trains."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lm.cli import main as lm_main
from lm.config import load_config
from lm.storage import ObjectStore
from lm.tune.sweep import tune

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
SPACE = {"train.lr": {"grid": [0.01, 0.00002]}, "train.seed": {"grid": [1, 2]}}


OVERRIDES = ["name=sweep", "train.workers=1", "train.zero_stage=1", "train.max_steps=20", "train.warmup_steps=2",
             "train.eval_interval=10", "train.log_interval=10", "train.batch_size=16", "train.min_lr=0.00001",
             f"tune.space={json.dumps(SPACE)}", "tune.grace_period=10", "tune.reduction_factor=2"]


def tune_args(root: Path, data: str) -> list[str]:
    """`lm tune` arguments; the trials train on ``data``, the session's tiny shards (the same data config)."""
    return ["-c", str(REPO / "configs/tiny.yaml"), f"storage.root={root}", f"data.output={data}", *OVERRIDES]


def terminated_in_saved_state(experiment: Path) -> bool:
    """Whether Tune's newest saved experiment state has a finished trial (what `--resume` starts from)."""
    for state in sorted(experiment.glob("experiment_state-*.json"))[-1:]:
        try:
            trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
        except (json.JSONDecodeError, KeyError, OSError):  # being written
            return False
        return any(t.get("status") == "TERMINATED" for t in trials)
    return False


@pytest.fixture(scope="module")
def sweep(ray_session, tiny_run, tmp_path_factory):
    """The sweep, interrupted: `lm tune` runs as its own driver on the shared cluster and is killed
    (SIGKILL, its trials die with it) once a first trial has finished; `--resume` then completes it."""
    root = tmp_path_factory.mktemp("tune")
    args = tune_args(root, tiny_run.cfg.data_uri)
    trials = root / "runs/sweep/tune/trials"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    with (root / "first-driver.log").open("wb") as out:
        driver = subprocess.Popen([sys.executable, "-m", "lm.cli", "tune", *args], env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not terminated_in_saved_state(root / "runs/sweep/tune/ray/sweep"):  # Tune saves it every few s
            assert driver.poll() is None, (root / "first-driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 10 minutes"
            time.sleep(0.5)
        driver.kill()
        driver.wait()
    finished_before = {p: p.stat().st_mtime for p in trials.glob("*/train/metrics.jsonl")}
    cfg = load_config(args[1], args[2:])
    return cfg, tune(cfg, log=lambda _: None, resume=True), finished_before


def test_sweep_runs_every_trial_and_asha_stops_the_hopeless_ones(sweep):
    _cfg, result, _finished_before = sweep
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
    cfg, result, _finished_before = sweep
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
    _cfg, result, _finished_before = sweep
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
    cfg, result, finished_before = sweep
    assert finished_before and len(result.table) == 4
    assert {p: p.stat().st_mtime for p in finished_before} == finished_before  # not trained again
    # a fresh start over an existing sweep is refused; --resume of a finished one runs nothing
    args = tune_args(Path(cfg.storage.root), cfg.data.output)
    assert lm_main(["tune", *args]) == 2
    assert "--resume" in capsys.readouterr().err
    assert lm_main(["tune", "--resume", *args]) == 0
    assert "4 trials" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in finished_before} == finished_before
