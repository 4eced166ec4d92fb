"""`lm train` on Ray Train + DeepSpeed (CPU, gloo): ZeRO stages, exact resume, resume on another
number of workers, and the published model directory. (Workers killed mid-run, resuming from the last
checkpoint: test_multinode, where a whole node with a worker goes away.)"""

import shutil
from pathlib import Path

import pytest

from lm.config import load_config
from lm.data.pipeline import data_uri
from lm.inference import generate_text
from lm.modeldir import load_model_dir
from lm.storage import ObjectStore
from lm.train.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def data_dir(tiny_run) -> str:
    """The tiny preset's shards, as the session's tiny run prepared them (every run here reads them)."""
    return data_uri(tiny_run.cfg)


def config(root: Path, data: str, name: str, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", [
        f"storage.root={root}", f"name={name}", f"data.output={data}", "train.log_interval=2",
        "train.eval_interval=10", "train.warmup_steps=4", "train.workers=2", *extra])


def losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history}


def test_zero3_trains_checkpoints_and_publishes_a_model(ray_session, data_dir, tmp_path, monkeypatch):
    """ZeRO-3 with gradient accumulation (ZeRO-1 runs in the resume test below, ZeRO-2 in the others)."""
    stage = 3
    monkeypatch.chdir(tmp_path)  # a relative storage root means this folder to the workers too
    cfg = config(Path("."), data_dir, f"zero{stage}", f"train.zero_stage={stage}", "train.max_steps=20",
                 "train.global_batch_tokens=2048")  # 2 micro-batches per step
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
    """On ZeRO-1: an exact resume, and a resume on one worker instead of two."""
    steps = ["train.max_steps=20", "train.zero_stage=1"]
    straight_run = train(config(tmp_path, data_dir, "straight", *steps), log=lambda _: None)
    straight = losses(straight_run.history)
    shards = [p.name for p in (Path(straight_run.best_checkpoint) / "state").iterdir() if "optim_states" in p.name]
    assert len(shards) == 2 and straight[20] < straight[1] - 0.5, (shards, straight)  # ZeRO-1 shards, it learns

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
