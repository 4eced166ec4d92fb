"""`lm train` on Ray Train + DeepSpeed (CPU, gloo): ZeRO stages, exact resume, resume on another
number of workers, a killed worker, and the published model directory."""

import shutil
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from lm.config import load_config
from lm.data.pipeline import prepare_data
from lm.inference import generate_text
from lm.modeldir import load_model_dir
from lm.storage import ObjectStore
from lm.train.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory) -> Path:
    """The tiny preset's shards, prepared once and shared by every run of this module."""
    out = tmp_path_factory.mktemp("train-data") / "data"
    prepare_data(load_config(REPO / "configs/tiny.yaml", [f"data.output={out}"]), log=lambda _: None)
    return out


def config(root: Path, data: Path, name: str, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", [
        f"storage.root={root}", f"name={name}", f"data.output={data}", "train.log_interval=2",
        "train.eval_interval=10", "train.warmup_steps=4", "train.workers=2", *extra])


def losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history}


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_checkpoints_and_publishes_a_model(ray_session, data_dir, tmp_path, monkeypatch, stage):
    accumulate = ["train.global_batch_tokens=2048"] if stage == 1 else []  # 2 micro-batches per step
    monkeypatch.chdir(tmp_path)  # a relative storage root means this folder to the workers too
    cfg = config(Path("."), data_dir, f"zero{stage}", f"train.zero_stage={stage}", "train.max_steps=20", *accumulate)
    summary = train(cfg, log=lambda _: None)
    curve = [r["loss"] for r in summary.history]
    assert summary.steps == 20 and curve[-1] < curve[0] - 0.5  # the loss falls (from ln 512 = 6.24)
    evals = [r for r in summary.history if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and all(r["val_bpb"] > 0 for r in evals)
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in summary.history if "mfu" in r)
    # a DeepSpeed checkpoint inside the Ray Train checkpoint, optimizer state sharded per rank
    best = Path(summary.best_checkpoint)
    shards = sorted(p.name for p in (best / "state").iterdir() if "optim_states" in p.name)
    assert len(shards) == 2, shards
    # the consolidated model directory generates without DeepSpeed
    loaded = load_model_dir(ObjectStore(cfg.storage), summary.model_uri)
    assert loaded.model.num_parameters() > 0
    assert isinstance(generate_text(loaded.model, loaded.tokenizer, ["ROMEO:"], cfg.generate)[0], str)
    for name in ("metrics.jsonl", "loss.png"):
        assert (tmp_path / "runs" / f"zero{stage}" / "train" / name).stat().st_size > 0
    assert any((tmp_path / "runs" / f"zero{stage}" / "train" / "tensorboard").iterdir())


def test_resume_continues_the_same_curve_and_on_fewer_workers(ray_session, data_dir, tmp_path):
    steps = ["train.max_steps=20"]
    straight = losses(train(config(tmp_path, data_dir, "straight", *steps), log=lambda _: None).history)

    train(config(tmp_path, data_dir, "halves", *steps, "train.stop_after_steps=10"), log=lambda _: None)
    shutil.copytree(tmp_path / "runs" / "halves", tmp_path / "runs" / "smaller")  # the same half, twice
    resumed = losses(train(config(tmp_path, data_dir, "halves", *steps), log=lambda _: None).history)
    assert sorted(resumed) == sorted(straight)  # one history across both invocations
    for step, loss in straight.items():  # CPU, gloo: the same arithmetic in the same order
        assert resumed[step] == pytest.approx(loss, abs=1e-4), step

    # 2 → 1 worker: the consolidated weights come back, the optimizer moments restart
    smaller = train(config(tmp_path, data_dir, "smaller", *steps, "train.workers=1", "train.batch_size=16"),
                    log=lambda _: None)
    after = losses(smaller.history)
    assert smaller.steps == 20 and after[10] == pytest.approx(straight[10], abs=1e-4)
    assert after[12] < straight[2] and abs(after[20] - straight[20]) < 0.5  # it carries on, not from scratch


def _train_worker_pids() -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_killed_worker_restarts_from_the_last_checkpoint(ray_session, data_dir, tmp_path):
    cfg = config(tmp_path, data_dir, "killed", "train.max_steps=40", "train.max_failures=1")
    ckpts = tmp_path / "runs" / "killed" / "train" / "ray"
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if any(ckpts.glob("checkpoint_*")) and (pids := _train_worker_pids()):
                psutil.Process(pids[-1]).kill()
                killed.append(pids[-1])
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    summary = train(cfg, log=lambda _: None)
    killer.join()
    assert killed, "no worker was killed"
    assert summary.steps == 40
    steps = [r["step"] for r in summary.history]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the curve goes on from the checkpoint
    curve = [r["loss"] for r in summary.history]
    assert curve[-1] < curve[0] - 1.0
    assert torch.isfinite(torch.tensor(curve)).all()
