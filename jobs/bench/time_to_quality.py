"""Benchmark time to quality: validation bits per byte on tinyshakespeare's last 10% (nanoGPT's split)
after a fixed budget of training time on this machine, with `lm train` (Ray Train + DeepSpeed), per recipe.

    python jobs/bench/time_to_quality.py --minutes 5 --seeds 2                    # every variant below
    python jobs/bench/time_to_quality.py --minutes 5 --variants baseline,muon     # some of them

The bundled text is cut at 90% of its characters: the first part is a source pinned to the train
split, the last 10% a source pinned to validation (no dedup across them, so validation is exactly
that text, cleaned). bits/byte = validation loss (nats/token) / ln 2 x tokens / bytes of the
validation split (from the data manifest). Each variant is configs/shakespeare-cpu.yaml + BASE + its own
overrides (each row of the ablation changes one thing against the row it names); every run's schedule spans
the budget of training time (``train.schedule_unit: seconds``; start-up, data preparation and evaluation
excluded, compilation included), so no run stops early or ends with its learning rate still high. Writes
JSON (every run), the ablation table into jobs/bench/README.md and a PNG. Target: at most 2.1 bits per
byte in 5 minutes. Runs one after another: give it a quiet machine (variants x seeds x ~6 minutes).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import statistics
import tempfile
from pathlib import Path

from results_io import machine, replace_section, write_result

from lm.config import load_config
from lm.train.trainer import train

REPO = Path(__file__).parents[2]
BASE = [  # the demo's model on one 2-core worker
    "tokenizer.vocab_size=2048", "model.n_layers=4", "model.n_heads=4", "model.d_model=128",
    "model.max_seq_len=128", "train.workers=1", "train.cpus_per_worker=2", "train.zero_stage=1",
    "train.batch_size=16", "train.lr=2e-3", "train.min_lr=1e-4", "train.warmup_steps=30",
    # every micro-batch of the val split, whatever the batch size and workers (320 of its 330 rows at batch 16,
    # as rows before 2026-12-04 16:40 measured; 20 batches of 8 saw half the split)
    "train.eval_interval=1000000", "train.eval_batches=1000", "train.log_interval=50",
    "train.schedule_unit=seconds", "train.max_steps=1000000", "data.dedup.exact=false", "data.dedup.near=false",
    "train.optimizer=adamw", "train.schedule=cosine",  # the baseline row's, whatever the demo's preset has now
]
WSD = ["train.schedule=wsd", "train.decay_fraction=0.3"]
MUON = [*WSD, "train.optimizer=muon", "train.muon_lr=0.02", "train.zero_stage=0"]  # clipping the gradient
# the row the last ablations change one thing against; with train.compile=true (recipe-compile: 2.092 against its
# 2.103 in the same batch) it is the recipe docs/benchmarks.md reports
RECIPE_ROW = "muon-resid-dropout-qk-norm"
RECIPE = [*MUON, "model.dropout=0.1", "model.attention_dropout=0", "model.qk_norm=true"]
TWO_WORKERS = ["train.workers=2", "train.cpus_per_worker=1", "train.batch_size=8", "train.global_batch_tokens=2048"]
VARIANTS: dict[str, tuple[str, list[str]]] = {  # name -> (the row it changes, its overrides on BASE)
    "baseline": ("", []),  # AdamW, cosine over the budget
    "wsd": ("baseline", WSD),
    "muon": ("wsd", MUON),
    "muon-dropout": ("muon", [*MUON, "model.dropout=0.1"]),  # the model overfits the 1 MB corpus by 2,000 steps
    # dropout on the residual stream only: on CPU the attention weights' dropout leaves the fused kernel (-30% tok/s)
    "muon-resid-dropout": ("muon-dropout", [*MUON, "model.dropout=0.1", "model.attention_dropout=0"]),
    "muon-resid-dropout-lr3": ("muon-resid-dropout", [*MUON, "model.dropout=0.1", "model.attention_dropout=0",
                                                      "train.muon_lr=0.03"]),  # regularised: a higher rate
    "muon-resid-dropout-qk-norm": ("muon-resid-dropout", [*MUON, "model.dropout=0.1", "model.attention_dropout=0",
                                                          "model.qk_norm=true"]),
    "muon-resid-dropout-0.15": ("muon-resid-dropout", [*MUON, "model.dropout=0.15", "model.attention_dropout=0"]),
    # one change each against the recipe (the best row so far)
    "recipe-compile": (RECIPE_ROW, [*RECIPE, "train.compile=true"]),
    "recipe-2x1": (RECIPE_ROW, [*RECIPE, *TWO_WORKERS]),  # 2 workers x 1 thread against 1 x 2
    "recipe-untied": (RECIPE_ROW, [*RECIPE, "model.tie_embeddings=false"]),
    "recipe-vocab-4096": (RECIPE_ROW, [*RECIPE, "tokenizer.vocab_size=4096", "model.vocab_size=4096"]),
    "recipe-6-layers": (RECIPE_ROW, [*RECIPE, "model.n_layers=6"]),  # deeper: fewer steps in the budget
    "recipe-relu2": (RECIPE_ROW, [*RECIPE, "model.activation=relu2"]),  # gated ReLU² against SwiGLU
    "recipe-softcap": (RECIPE_ROW, [*RECIPE, "model.logit_softcap=15"]),  # measured only: no HF equivalent
    "recipe-chunked-loss": (RECIPE_ROW, [*RECIPE, "train.loss_kernel=chunked"]),  # the head and loss in chunks
    "recipe-context-256": (RECIPE_ROW, [*RECIPE, "model.max_seq_len=256", "train.batch_size=8"]),  # same tokens/step
    "recipe-wide-192": (RECIPE_ROW, [*RECIPE, "model.d_model=192", "model.n_heads=6"]),  # width: heads stay 32 wide
    "recipe-3-layers": (RECIPE_ROW, [*RECIPE, "model.n_layers=3"]),  # shallower: more steps in the budget
    "recipe-batch-32": (RECIPE_ROW, [*RECIPE, "train.batch_size=32"]),  # twice the tokens per step, half the steps
    "recipe-batch-8": (RECIPE_ROW, [*RECIPE, "train.batch_size=8"]),  # half the tokens per step, more steps
}


def run(minutes: float, overrides: list[str], seed: int) -> dict:
    """One training run on the split; its final validation bits per byte and throughput."""
    text = gzip.decompress((REPO / "lm/corpora/tinyshakespeare.txt.gz").read_bytes()).decode()
    cut = int(len(text) * 0.9)
    with tempfile.TemporaryDirectory(prefix="lm-ttq-") as tmp:
        for name, part in (("a-train", text[:cut]), ("b-val", text[cut:])):
            (Path(tmp) / name).mkdir()
            (Path(tmp) / name / "input.txt").write_text(part)
        sources = (f"[{{name: train90, uri: '{tmp}/a-train/', split: train}}, "
                   f"{{name: last10, uri: '{tmp}/b-val/', split: val}}]")
        cfg = load_config(REPO / "configs/shakespeare-cpu.yaml",
                          [f"storage.root={tmp}/store", f"data.sources={sources}", *BASE, *overrides,
                           f"train.max_seconds={minutes * 60}", f"train.seed={seed}"])
        summary = train(cfg)
    last = summary.history[-1]
    speed = [r for r in summary.history if "tokens_per_s" in r][1:] or summary.history  # past compilation
    return {"seed": seed, "steps": summary.steps, "train_s": round(last["train_s"], 1),
            "val_bpb": round(last["val_bpb"], 4), "tokens_per_s": round(statistics.median(
                r["tokens_per_s"] for r in speed), 1), "model_gflops": round(statistics.median(
                r["model_gflops"] for r in speed), 2), "load_1m": round(os.getloadavg()[0], 2)}


def table(rows: list[dict], minutes: float) -> str:
    lines = [f"## Time to quality ({minutes:g} minutes of training, tinyshakespeare's last 10%)", "",
             "| variant | changes against | val bits/byte (mean of seeds) | seeds | steps | tokens/s | model GFLOP/s "
             "| run |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['against'] or '—'} | **{r['val_bpb']:.3f}** "
                     f"({', '.join(f'{x:.3f}' for x in r['val_bpb_seeds'])}) | {len(r['runs'])} | {r['steps']:.0f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['model_gflops']:.1f} | {r['run']} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["variant"] for r in rows], [r["val_bpb"] for r in rows], color="#4c72b0")
    ax.axvline(target, color="#c44e52", linestyle="--", label=f"target {target}")
    ax.set_xlabel("validation bits per byte (lower is better)")
    ax.set_xlim(min(min(r["val_bpb"] for r in rows), target) - 0.2, None)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def earlier_rows(out: Path, minutes: float) -> dict[str, dict]:
    """The rows of earlier runs with the same budget (kept beside this run's, each marked with its run)."""
    if not out.exists():
        return {}
    earlier = json.loads(out.read_text())
    return {r["variant"]: r for r in earlier["variants"]} if earlier["budget_minutes"] == minutes else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="training time budget per run")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="jobs/bench/results/time_to_quality.json")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = earlier_rows(Path(args.out), args.minutes)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")  # the rows of one run compare
    for name in args.variants.split(","):  # results written after each variant: a long run keeps what it has
        against, overrides = VARIANTS[name]
        runs = [run(args.minutes, overrides, 1337 + seed) for seed in range(args.seeds)]
        rows[name] = {"variant": name, "against": against, "overrides": overrides, "runs": runs, "run": started,
                      "val_bpb_seeds": [r["val_bpb"] for r in runs],
                      **{k: statistics.mean(r[k] for r in runs) for k in ("val_bpb", "steps", "tokens_per_s",
                                                                           "model_gflops")}}
        rows = {v: rows[v] for v in VARIANTS if v in rows}
        write_result(args.out, {"machine": machine(), "budget_minutes": args.minutes, "target_bpb": 2.1,
                                "base": BASE, "variants": list(rows.values())})
        plot(list(rows.values()), 2.1, Path(args.out).with_suffix(".png"))
        replace_section(REPO / "jobs/bench/README.md", "## Time to quality", table(list(rows.values()), args.minutes))


if __name__ == "__main__":
    main()
