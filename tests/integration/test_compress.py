"""Model compression on Ray Train + DeepSpeed: a smaller student distilled from the session's tiny run
(lm.train.distill wired into lm.train.loop)."""

import json
from pathlib import Path

import pytest

from lm.config import load_config
from lm.modeldir import load_model_dir
from lm.storage import ObjectStore
from lm.train.trainer import train

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]


def test_ray_train_distils_a_smaller_student_from_a_teacher(tiny_run, tmp_path):
    """2 workers, ZeRO-1 (optimizer state sharded per rank), 20 steps of a d_model-32 student on the tiny
    run's shards, taught by its model."""
    teacher = tiny_run.summary["model_uri"]
    cfg = load_config(REPO / "configs/tiny.yaml", [
        f"storage.root={tmp_path}", "name=student", f"data.output={tiny_run.cfg.data_uri}", "model.d_model=32",
        "train.workers=2", "train.zero_stage=1", "train.max_steps=20", "train.eval_interval=10",
        "train.log_interval=2", "train.warmup_steps=4", f"train.distill.teacher={teacher}", "train.distill.weight=0.5"])
    lines: list[str] = []
    summary = train(cfg, log=lines.append, prepare=False)  # the shards are the teacher's own

    curve = [r["loss"] for r in summary.history]
    assert summary.steps == 20 and curve[-1] < curve[0] - 0.5, curve
    logged = [r for r in summary.history if "distill_kl" in r]
    assert len(logged) == len(summary.history) >= 10  # every training record carries the terms
    assert logged[-1]["distill_kl"] < logged[0]["distill_kl"]  # the student moves towards the teacher
    for r in logged:  # the objective is (1 - w) CE + w T² KL with w = 0.5, T = 1 (means over both ranks)
        assert r["loss"] == pytest.approx(0.5 * r["distill_ce"] + 0.5 * r["distill_kl"], rel=1e-4)
    evals = [r for r in summary.history if "val_loss" in r]
    assert [r["step"] for r in evals] == [10, 20] and evals[-1]["val_loss"] < evals[0]["val_loss"]

    store = ObjectStore(cfg.storage)
    metrics = [json.loads(line) for line in store.read_text(f"{cfg.run_uri}/train/metrics.jsonl").splitlines()]
    assert all("distill_kl" in m for m in metrics)
    student = load_model_dir(store, summary.model_uri)
    assert student.model.cfg.d_model == 32 and load_model_dir(store, teacher).model.cfg.d_model == 64
    assert student.lineage["distill"] == {"teacher": teacher, "temperature": 1.0, "weight": 0.5}
    assert student.lineage["trainer"] == "ray+deepspeed" and student.lineage["zero_stage"] == 1
    shards = [p.name for p in (Path(summary.best_checkpoint) / "state").iterdir() if "optim_states" in p.name]
    assert len(shards) == 2, shards  # ZeRO-1: one optimizer shard per rank
