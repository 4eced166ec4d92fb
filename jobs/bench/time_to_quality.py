"""Benchmark time to quality: validation bits per byte on tinyshakespeare's last 10% (nanoGPT's split)
after a fixed training budget on this machine, with `lm train` (Ray Train + DeepSpeed).

    python jobs/bench/time_to_quality.py --minutes 5 --out jobs/bench/results/time_to_quality.json

The bundled text is cut at 90% of its characters: the first part is a source pinned to the train
split, the last 10% a source pinned to validation (no dedup across them, so validation is exactly
that text, cleaned). bits/byte = validation loss (nats/token) / ln 2 x tokens / bytes of the
validation split (from the data manifest). The config is configs/shakespeare-cpu.yaml plus the
overrides below (recorded in the JSON). Target: at most 2.1 bits per byte in 5 minutes.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
from pathlib import Path

from results_io import machine, write_result

from lm.config import load_config
from lm.train.trainer import train

REPO = Path(__file__).parents[2]
RECIPE = [  # measured best here so far: the demo's model, one 2-core worker, a schedule that ends with the budget
    "tokenizer.vocab_size=2048", "model.n_layers=4", "model.n_heads=4", "model.d_model=128",
    "model.max_seq_len=128", "train.workers=1", "train.cpus_per_worker=2", "train.zero_stage=1",
    "train.batch_size=16", "train.lr=2e-3", "train.min_lr=1e-4", "train.warmup_steps=30",
    "train.eval_interval=200", "train.eval_batches=20", "train.log_interval=50",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget (wall clock of the loop)")
    parser.add_argument("--steps", type=int, default=700, help="schedule length (about what the budget allows)")
    parser.add_argument("--out", default="jobs/bench/results/time_to_quality.json")
    parser.add_argument("overrides", nargs="*", help="more config overrides")
    args = parser.parse_args()
    text = gzip.decompress((REPO / "lm/corpora/tinyshakespeare.txt.gz").read_bytes()).decode()
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory(prefix="lm-ttq-") as tmp:
        (Path(tmp) / "a-train").mkdir()
        (Path(tmp) / "b-val").mkdir()
        (Path(tmp) / "a-train/input.txt").write_text(text[:cut])
        (Path(tmp) / "b-val/input.txt").write_text(text[cut:])
        sources = (f"[{{name: train90, uri: '{tmp}/a-train/', split: train}}, "
                   f"{{name: last10, uri: '{tmp}/b-val/', split: val}}]")
        overrides = [*RECIPE, f"train.max_steps={args.steps}", f"train.max_seconds={args.minutes * 60}",
                     "data.dedup.exact=false", "data.dedup.near=false", *args.overrides]
        cfg = load_config(REPO / "configs/shakespeare-cpu.yaml",
                          [f"storage.root={tmp}/store", f"data.sources={sources}", *overrides])
        summary = train(cfg)
    evals = [r for r in summary.history if "val_bpb" in r]
    result = {
        "machine": machine(),
        "budget_minutes": args.minutes, "train_seconds_with_startup": round(summary.seconds, 1),
        "steps": summary.steps, "val_bpb": round(evals[-1]["val_bpb"], 4), "val_loss": round(evals[-1]["val_loss"], 4),
        "best_val_bpb": round(min(r["val_bpb"] for r in evals), 4),
        "curve": [{"step": r["step"], "val_bpb": round(r["val_bpb"], 4)} for r in evals],
        "target_bpb": 2.1, "workers": cfg.train.workers, "zero_stage": cfg.train.zero_stage,
        "overrides": overrides,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
