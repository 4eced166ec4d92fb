"""`lm train` on Ray Train + DeepSpeed (CPU, gloo): ZeRO stages, exact resume, resume on another
number of workers, and the published model directory. (Workers killed mid-run, resuming from the last
checkpoint: test_multinode, where a whole node with a worker goes away.)"""

import shutil
from pathlib import Path

import pytest

from lm.config import load_config
from lm.inference import generate_text
from lm.modeldir import load_model_dir
from lm.storage import ObjectStore
from lm.train.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def data_dir(tiny_run) -> str:
    """The tiny preset's shards, as the session's tiny run prepared them (every run here reads them)."""
    return tiny_run.cfg.data_uri


def config(root: Path, data: str, name: str, *extra: str):
    return load_config(REPO / "configs/tiny.yaml", [
        f"storage.root={root}", f"name={name}", f"data.output={data}", "train.log_interval=2",
        "train.eval_interval=10", "train.warmup_steps=4", "train.workers=2", *extra])


def losses(history: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in history}


ZERO3 = ["train.zero_stage=3", "train.max_steps=20", "train.global_batch_tokens=2048"]  # 2 micro-batches a step


@pytest.fixture(scope="module")
def zero3_run(data_dir, tmp_path_factory):
    """20 steps of ZeRO-3 with gradient accumulation on 2 workers, uninterrupted, from a relative storage
    root (it means the driver's folder to the workers too); the resume test's reference curve."""
    root = tmp_path_factory.mktemp("zero3")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cfg = config(Path("."), data_dir, "zero3", *ZERO3)
        return cfg, train(cfg, log=lambda _: None), root


def test_zero3_trains_checkpoints_and_publishes_a_model(zero3_run, monkeypatch):
    """ZeRO-3 with gradient accumulation (ZeRO-1 runs in the distillation test, ZeRO-2 in the others)."""
    cfg, summary, root = zero3_run
    monkeypatch.chdir(root)
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
        assert (root / "runs" / "zero3" / "train" / name).stat().st_size > 0
    assert any((root / "runs" / "zero3" / "train" / "tensorboard").iterdir())


def test_resume_continues_the_same_curve_and_on_fewer_workers(zero3_run, data_dir, tmp_path):
    """An exact resume of the ZeRO-3 run above, and a resume on one worker instead of two."""
    straight = losses(zero3_run[1].history)
    train(config(tmp_path, data_dir, "halves", *ZERO3, "train.stop_after_steps=10"), log=lambda _: None)
    shutil.copytree(tmp_path / "runs" / "halves", tmp_path / "runs" / "smaller")  # the same half, twice
    resumed = losses(train(config(tmp_path, data_dir, "halves", *ZERO3), log=lambda _: None).history)
    assert sorted(resumed) == sorted(straight)  # one history across both invocations
    for step, loss in straight.items():  # CPU, gloo: the same arithmetic in the same order
        assert resumed[step] == pytest.approx(loss, abs=1e-4), step

    # 2 → 1 worker (4 micro-batches a step: the same global batch): the consolidated weights come back,
    # the optimizer moments restart
    smaller = train(config(tmp_path, data_dir, "smaller", *ZERO3, "train.workers=1"), log=lambda _: None)
    after = losses(smaller.history)
    assert smaller.steps == 20 and after[10] == pytest.approx(straight[10], abs=1e-4)
    assert after[12] < straight[2] and abs(after[20] - straight[20]) < 0.5  # it carries on, not from scratch
