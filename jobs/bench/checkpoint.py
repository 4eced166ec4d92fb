"""Checkpoint cost (issue 18): the time `lm train` spends saving a checkpoint, as a share of training time
at the default ``train.eval_interval`` (100 steps; under Ray Train every evaluation saves a checkpoint),
on S3 and on a folder, for the demo model and a gpt2-124m-shaped one.

    tests/isolated .venv/bin/python jobs/bench/checkpoint.py              # both models, S3 and a folder
    tests/isolated .venv/bin/python jobs/bench/checkpoint.py --models demo --demo-steps 40 --demo-every 20
    ... --label "SYNC upload (before)" --out /tmp/sync.json --no-readme; ... --before /tmp/sync.json

One run starts a SeaweedFS S3 server on 127.0.0.1 (as jobs/bench/scale.py does; its data in a temporary
folder, removed at the end) and one local Ray, prepares the demo's data (configs/shakespeare-cpu.yaml:
tinyshakespeare, its tokenizer) once in S3 and once in a folder, then runs the real trainer
(:func:`lm.train.trainer.train`, Ray Train + DeepSpeed) for each model and storage in turn, everything
under the storage being measured (data, Ray Train's checkpoints, the run's outputs):

* **demo**: configs/shakespeare-cpu.yaml as `make demo` trains it (2 workers, ZeRO-2, fp32, 8 sequences
  of 128 tokens per worker), ``--demo-steps`` steps with a checkpoint every ``--demo-every``;
* **gpt2-124m**: configs/gpt2-124m.yaml's model shape (12 layers, d_model 768, d_ff 2048, vocabulary
  50304: 124M parameters; random weights, trained on the demo's tokens) and ZeRO stage, on this CPU:
  2 workers, fp32 (bf16 is ~10x slower on CPU), no compile, ``--gpt2-batch`` sequences of ``--seq-len``
  tokens per worker and no accumulation; ``--gpt2-steps`` steps with a checkpoint every ``--gpt2-every``.

lm.train.loop ``Worker._report`` records on rank 0, in the history record of each checkpoint's step:
``checkpoint_s`` (the seconds training waits: DeepSpeed's save_checkpoint, RNG, consolidated weights,
TrainerState, the TensorBoard upload, ``ray.train.report``), ``checkpoint_save_s`` (DeepSpeed's
``save_checkpoint`` alone, a local write) and ``checkpoint_report_s`` (``ray.train.report``: the ranks'
barrier, then with ``checkpoint_upload_mode`` SYNC the upload to storage and removing the local folder, with
ASYNC, lm.train.loop's mode today, only handing the folder to Ray's upload thread). Before each run the
bench waits (at most ``--settle-s``) for the CPUs to be idle, e.g. SeaweedFS digesting the last upload.
A step's seconds: the median of the log intervals (``log_interval`` 1 for gpt2-124m) before the first
checkpoint, the first (start-up) left out. *Blocking*: the median ``checkpoint_s``. *Loop cost*: how much
longer than their count x the step the steps from one checkpoint to the next took (the blocking time, the
evaluation, and any slowdown of the steps while an upload runs in the background). Share = seconds /
(seconds + 100 x step): measured per-step and per-checkpoint times, the share extrapolated to
eval_interval 100 (the issue asks for asynchronous saving above 5%).

Writes ``--out`` (JSON; with ``--before``, an earlier result's cases too), a PNG beside it, prints the
Markdown tables and replaces the section "Checkpoint cost" of jobs/bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

from results_io import machine, replace_section, write_result
from scale import BUCKET, start_s3, stop_s3

from lm.config import TrainConfig, join_uri, load_config
from lm.model import num_params
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]
README = Path(__file__).parent / "README.md"
SECTION = "## Checkpoint cost (`jobs/bench/checkpoint.py`)"
EVAL_INTERVAL = TrainConfig.model_fields["eval_interval"].default  # 100: the default the share is quoted at
GOAL = 0.05  # above this share, the issue asks for asynchronous saving


def model_overrides(args, model: str) -> tuple[Path, list[str]]:
    """The config and the overrides of one model's short run (see the module docstring)."""
    if model == "demo":
        return REPO / "configs/shakespeare-cpu.yaml", [
            f"train.max_steps={args.demo_steps}", f"train.eval_interval={args.demo_every}",
            f"train.log_interval={args.demo_log}"]
    return REPO / "configs/gpt2-124m.yaml", [
        f"data.seq_len={args.seq_len}", "train.workers=2", "train.cpus_per_worker=1", "train.gpus_per_worker=0",
        "train.precision=fp32", "train.compile=false", f"train.batch_size={args.gpt2_batch}",
        "train.global_batch_tokens=null", "train.warmup_steps=2", "train.eval_batches=2",
        f"train.max_steps={args.gpt2_steps}", f"train.eval_interval={args.gpt2_every}", "train.log_interval=1"]


def storage_overrides(kind: str, s3: list[str], root: Path) -> list[str]:
    if kind == "s3":
        return [*s3, f"storage.root=s3://{BUCKET}/checkpoint"]
    return [f"storage.root={root / 'folder'}"]


def prepare(kind: str, base: list[str]) -> str:
    """The demo's data prepared under this storage; returns its URI (every model trains on it)."""
    from lm.data.pipeline import prepare_data

    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", [*base, "name=ckpt-data"])
    prepare_data(cfg, ObjectStore(cfg.storage), log=lambda line: print(f"data ({kind}): {line}", flush=True))
    return cfg.data_uri


def stored_mb(store: ObjectStore, run_uri: str, path: str | None) -> float | None:
    """The size of one of Ray Train's checkpoint directories (``path`` in the run's storage filesystem)."""
    if path is None:
        return None
    import pyarrow.fs as pafs

    fs, _ = store.pyarrow_filesystem(join_uri(run_uri, "train"))
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return round(sum(i.size or 0 for i in infos if i.type == pafs.FileType.File) / 1e6, 1)


def intervals(history: list[dict], tokens_per_step: int) -> list[tuple[int, int, float]]:
    """(step before, last step, seconds) of each log interval after the first record (step 1, start-up)."""
    out, before = [], None
    for r in history:
        if "tokens_per_s" in r:
            if before is not None:
                out.append((before, r["step"], (r["step"] - before) * tokens_per_step / r["tokens_per_s"]))
            before = r["step"]
    return out


def loop_costs(spans: list[tuple[int, int, float]], marks: list[int], step_s: float) -> list[float]:
    """For each checkpoint but the last: the seconds the steps up to the next one took beyond their count x
    the clean step (the checkpoint's blocking time, the evaluation and any slowdown by a background upload)."""
    return [sum(s for a, b, s in spans if here <= a and b <= after) - (after - here) * step_s
            for here, after in pairwise(marks)]


def summarize(cfg, summary, store: ObjectStore) -> dict:
    """One run's clean step, its checkpoints' blocking seconds and loop costs, the shares at eval_interval 100."""
    tc = cfg.train
    spans = intervals(summary.history, tc.batch_size * tc.workers * cfg.seq_len)
    saves = [{k: round(r[k], 3) for k in ("step", "checkpoint_s", "checkpoint_save_s", "checkpoint_report_s")}
             for r in summary.history if "checkpoint_s" in r]
    marks = [s["step"] for s in saves]
    clean = [s / (b - a) for a, b, s in spans if b <= marks[0]]  # before the first checkpoint: nothing in flight
    step_s = statistics.median(clean)
    costs = loop_costs(spans, marks, step_s)
    median = {k: statistics.median(s[k] for s in saves)
              for k in ("checkpoint_s", "checkpoint_save_s", "checkpoint_report_s")}
    median["checkpoint_other_s"] = median["checkpoint_s"] - median["checkpoint_save_s"] - median["checkpoint_report_s"]
    median["loop_cost_s"] = statistics.median(costs) if costs else float("nan")
    mb = stored_mb(store, cfg.run_uri, summary.best_checkpoint)
    return {"params_m": round(num_params(cfg.model) / 1e6, 1), "workers": tc.workers, "zero_stage": tc.zero_stage,
            "precision": tc.precision, "batch_size": tc.batch_size, "seq_len": cfg.seq_len,
            "steps": summary.steps, "checkpoint_every": tc.eval_interval, "fit_s": round(summary.seconds, 1),
            "step_s": round(step_s, 4), "clean_step_s": [round(s, 4) for s in clean],
            **{k: round(v, 3) for k, v in median.items()}, "checkpoints": saves,
            "loop_costs_s": [round(c, 2) for c in costs],
            "checkpoint_mb": mb, "share": share(median["checkpoint_s"], step_s),
            "loop_share": share(median["loop_cost_s"], step_s), "load_average_1m": round(os.getloadavg()[0], 2)}


def share(seconds: float, step_s: float) -> float:
    """``seconds`` spent once per EVAL_INTERVAL steps of ``step_s``, as a share of that time."""
    return round(seconds / (seconds + EVAL_INTERVAL * step_s), 4)


def settle(limit_s: float) -> float:
    """Wait until the CPUs are idle (below 25% over 2 s), at most ``limit_s``; returns the seconds waited."""
    import psutil

    start = time.perf_counter()
    while psutil.cpu_percent(interval=2) > 25 and time.perf_counter() - start < limit_s:
        pass
    return round(time.perf_counter() - start, 1)


def run_case(args, model: str, kind: str, base: list[str], data: str) -> dict:
    from lm.train.trainer import train

    waited = settle(args.settle_s)
    path, overrides = model_overrides(args, model)
    cfg = load_config(path, [*base, f"name=ckpt-{model}-{kind}", f"data.output={data}", "train.max_seconds=null",
                             *overrides, *args.overrides])
    store = ObjectStore(cfg.storage)
    summary = train(cfg, store, log=lambda line: print(line, flush=True), prepare=False)
    result = {"model": model, "storage": kind, "config": path.name, "settle_s": waited,
              **summarize(cfg, summary, store)}
    print(f"checkpoint: {model} on {kind}: step {result['step_s']:.3f} s, checkpoint {result['checkpoint_s']:.2f} s "
          f"({result['checkpoint_mb']} MB) → {result['share']:.1%} at eval_interval {EVAL_INTERVAL}", flush=True)
    return result


def measure(args, root: Path, s3: list[str]) -> list[dict]:
    """Every model on every storage, in one local Ray (the models in turn, S3 and folder side by side)."""
    import ray

    from lm.cluster import connect

    bases = {kind: storage_overrides(kind, s3, root) for kind in args.storages.split(",")}
    data = {kind: prepare(kind, base) for kind, base in bases.items()}
    connect()
    try:
        return [run_case(args, model, kind, base, data[kind])
                for model in args.models.split(",") for kind, base in bases.items()]
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------- reporting


def table(cases: list[dict]) -> str:
    lines = ["| model (parameters) | storage | checkpoint, MB | step, s | checkpoint blocks training, s: median (each) "
             "| DeepSpeed save_checkpoint, s | weights + RNG + state + TensorBoard + cleanup, s | ray.train.report, s "
             f"| loop cost, s | share at eval_interval {EVAL_INTERVAL}: blocking (loop cost) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        each = ", ".join(f"{s['checkpoint_s']:.2f}" for s in c["checkpoints"])
        mark = " (> 5%)" if c["share"] > GOAL else ""
        lines.append(f"| {c['model']} ({c['params_m']:g} M) | {c['storage']} | {c['checkpoint_mb']:,} | "
                     f"{c['step_s']:.3f} | {c['checkpoint_s']:.2f} ({each}) | {c['checkpoint_save_s']:.2f} | "
                     f"{c['checkpoint_other_s']:.2f} | {c['checkpoint_report_s']:.2f} | {c['loop_cost_s']:.2f} | "
                     f"**{c['share']:.1%}**{mark} ({c['loop_share']:.1%}) |")
    return "\n".join(lines)


def findings(result: dict) -> str:
    """One line: the blocking share before → now per case (with ``--before``), the machine's load."""
    now = {(c["model"], c["storage"]): c for c in result["cases"]}
    runs = [r for r in (result.get("before"), result) if r]
    loads = [c["load_average_1m"] for r in runs for c in r["cases"]]
    parts = [f"{m} on {k}: {c['share']:.1%} → {now[m, k]['share']:.1%} (loop cost {c['loop_share']:.1%} → "
             f"{now[m, k]['loop_share']:.1%})" for c in (result.get("before") or {}).get("cases", [])
             if (m := c["model"], k := c["storage"]) in now]
    text = f"Blocking share at eval_interval {EVAL_INTERVAL}, before → now: {'; '.join(parts)}. " if parts else ""
    return text + (f"1-min load average at the end of the runs: {min(loads):g}–{max(loads):g} (other jobs shared "
                   "the 2 CPUs; steps and loop costs vary with them, the blocking times much less).")


def markdown(result: dict) -> str:
    text = f"{result['label']}:\n\n{table(result['cases'])}"
    if result.get("before"):
        text = f"{result['before']['label']}:\n\n{table(result['before']['cases'])}\n\n{text}"
    return f"{text}\n\n{findings(result)}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in (result.get("before"), result) if r]
    cases = [(r["label"].split(" (")[0], c) for r in runs for c in r["cases"]]
    names = [f"{c['model']}\n{c['storage']}\n{label}" for label, c in cases]
    fig, (parts, shares) = plt.subplots(1, 2, figsize=(6 + 1.2 * len(cases), 5))
    bottom = [0.0] * len(cases)
    for key, label in (("checkpoint_save_s", "DeepSpeed save_checkpoint"),
                       ("checkpoint_other_s", "weights, RNG, state, TensorBoard, cleanup"),
                       ("checkpoint_report_s", "ray.train.report")):
        values = [c[key] for _, c in cases]
        parts.bar(names, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    parts.set(ylabel="seconds (median)", title="one checkpoint: time training waits")
    parts.legend(fontsize=7)
    x = range(len(cases))
    shares.bar([i - 0.2 for i in x], [100 * c["share"] for _, c in cases], 0.4, label="blocking")
    shares.bar([i + 0.2 for i in x], [100 * c["loop_share"] for _, c in cases], 0.4, label="loop cost")
    shares.axhline(100 * GOAL, color="tab:red", linestyle="--", label="5%")
    shares.set_xticks(list(x), names)
    shares.set(ylabel="% of training time", title=f"checkpoint share at eval_interval {EVAL_INTERVAL}")
    shares.legend(fontsize=7)
    for ax in (parts, shares):
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup(result: dict) -> str:
    """The runs' settings, in words (from the result's cases)."""
    runs = []
    for c in result["cases"]:
        if c["storage"] != result["cases"][0]["storage"]:
            continue
        what = ("configs/shakespeare-cpu.yaml as `make demo` trains it" if c["model"] == "demo" else
                "configs/gpt2-124m.yaml's model shape and ZeRO stage, random weights, on this CPU")
        runs.append(f"{c['model']}: {what} ({c['workers']} workers, ZeRO-{c['zero_stage']}, {c['precision']}, "
                    f"{c['batch_size']} x {c['seq_len']} tokens per worker), {c['steps']} steps, a checkpoint every "
                    f"{c['checkpoint_every']}")
    return "; ".join(runs)


def update_readme(result: dict) -> None:
    """Replace (or append) the section "Checkpoint cost" of jobs/bench/README.md."""
    section = (
        f"{SECTION}\n\nMeasured on {result['machine']} (a VM shared with other jobs, no GPU), SeaweedFS S3 on "
        f"127.0.0.1 (the same 2 cores) or a local folder (the same disk), one local Ray: `tests/isolated "
        f".venv/bin/{result['command']}`; {setup(result)}. Per-step and per-checkpoint seconds are measured (rank 0; "
        "lm.train.loop `Worker._report` records them); a step: the median of the log intervals before the first "
        "checkpoint. *Blocking*: the time `_report` holds training up. *Loop cost*: the seconds the steps from a "
        "checkpoint to the next took beyond their count x the step (blocking + the evaluation + any slowdown by a "
        "background upload; one or two windows). Shares are extrapolated to one checkpoint per "
        f"{EVAL_INTERVAL} steps (the default `train.eval_interval`): seconds / (seconds + {EVAL_INTERVAL} x step). "
        "Checkpoint MB: one of Ray Train's checkpoint directories (DeepSpeed's files + the consolidated weights). "
        f"From `results/checkpoint.json` (plot: `results/checkpoint.png`).\n\n{result['markdown']}\n")
    replace_section(README, SECTION, section)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,gpt2-124m", help="comma-separated: demo, gpt2-124m")
    parser.add_argument("--storages", default="s3,folder", help="comma-separated: s3, folder")
    parser.add_argument("--demo-steps", type=int, default=150)
    parser.add_argument("--demo-every", type=int, default=50, help="demo: steps between checkpoints")
    parser.add_argument("--demo-log", type=int, default=10, help="demo: steps between log records")
    parser.add_argument("--gpt2-steps", type=int, default=20)
    parser.add_argument("--gpt2-every", type=int, default=10, help="gpt2-124m: steps between checkpoints")
    parser.add_argument("--gpt2-batch", type=int, default=1, help="gpt2-124m: sequences per worker")
    parser.add_argument("--seq-len", type=int, default=128, help="gpt2-124m: tokens per sequence (the demo data's)")
    parser.add_argument("--settle-s", type=float, default=90, help="longest wait for idle CPUs before a run")
    parser.add_argument("--label", default="ASYNC upload (lm.train.loop today)", help="what this run measures")
    parser.add_argument("--before", default=None, help="an earlier result JSON to show first (e.g. the SYNC upload)")
    parser.add_argument("--out", default="jobs/bench/results/checkpoint.json")
    parser.add_argument("--no-readme", action="store_true", help="leave jobs/bench/README.md alone")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for every run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = Path(tempfile.mkdtemp(prefix="lm-ckpt-bench-"))
    proc, start = None, time.perf_counter()
    try:
        proc, s3 = start_s3(root / "s3") if "s3" in args.storages.split(",") else (None, [])
        cases = measure(args, root, s3)
    finally:
        if proc is not None:
            stop_s3(proc)
        shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "checkpoint", "label": args.label, "machine": machine(),
              "command": " ".join(["python", *sys.argv]), "eval_interval": EVAL_INTERVAL, "overrides": args.overrides,
              "wall_s": round(time.perf_counter() - start), "cases": cases}
    if args.before:
        before = json.loads(Path(args.before).read_text())
        result["before"] = {k: before[k] for k in ("label", "command", "cases")}
    result["markdown"] = markdown(result)
    write_result(args.out, result)
    plot(result, Path(args.out).with_suffix(".png"))
    print(result["markdown"])
    if not args.no_readme:
        update_readme(result)


if __name__ == "__main__":
    main()
