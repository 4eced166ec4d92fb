"""The evaluation report: ``report.json`` + ``report.md`` + PNG plots, published together (all or none).

Plots: ``training.png`` (the run's curves, read from its TensorBoard event files under
``<run>/train/tensorboard/``, else from ``<run>/train/metrics.jsonl``; neither → the report says so),
``metrics.png`` (bits per byte per set: the model beside the n-gram baseline, and beside the baseline
model when comparing) and ``comparison.png`` (each compare rule's improvement against its thresholds).
With lm-evaluation-harness tasks, report.md has their metrics and ``harness_requests.jsonl`` every request.

    curves, note = training_curves(store, cfg.run_uri)
    uri = write_report(store, out_uri, report, curves)      # → <out>/report.md
"""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from lm.config import join_uri
from lm.sample_text import show_documents
from lm.storage import ObjectStore

Curves = dict[str, list[tuple[int, float]]]


def _tensorboard_scalars(folder: Path) -> Curves:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags().get("scalars", [])}


def training_curves(store: ObjectStore, run_uri: str) -> tuple[Curves, str]:
    """Scalar curves of the run (tag → [(step, value)]) and where they came from (or why there are none)."""
    tb_uri = join_uri(run_uri, "train", "tensorboard")
    if [u for u in store.list(tb_uri) if "tfevents" in u.rsplit("/", 1)[-1]]:
        with tempfile.TemporaryDirectory(prefix="lm-tb-") as tmp:
            store.download_dir(tb_uri, tmp)
            curves = {}
            for folder in sorted({p.parent for p in Path(tmp).rglob("*tfevents*")}):
                curves.update(_tensorboard_scalars(folder))
        if curves:
            return curves, f"TensorBoard logs {tb_uri}"
    jsonl = join_uri(run_uri, "train", "metrics.jsonl")
    if store.exists(jsonl):
        curves: Curves = {}
        for line in store.read_text(jsonl).splitlines():
            record = json.loads(line) if line.strip() else {}
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    curves.setdefault(key, []).append((record["step"], float(value)))
        return curves, f"no TensorBoard logs; curves from {jsonl}"
    return {}, f"no training logs at {tb_uri} or {jsonl}"


def _png(draw: Callable, size: tuple[float, float] = (7, 4)) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=100)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def training_png(curves: Curves) -> bytes:
    """Loss-like curves (train loss, validation loss and bpb) against step."""
    shown = [t for t in curves if t.rsplit("/", 1)[-1] in ("loss", "val_loss", "val_bpb")] or list(curves)[:4]

    def draw(ax):
        for tag in shown:
            ax.plot([s for s, _ in curves[tag]], [v for _, v in curves[tag]], "o-" if "val" in tag else "-",
                    markersize=3, label=tag)
        ax.set_xlabel("step")
        ax.set_title("training curves")
        ax.legend()

    return _png(draw)


def metrics_png(report: dict) -> bytes:
    """Bits per byte per set: the model, the n-gram baseline, and the baseline model if compared."""
    names = list(report["sets"])
    series = [("model", [report["sets"][n]["model"]["bpb"] for n in names])]
    if all(report["sets"][n].get("ngram") for n in names):
        series.append((f"{report['ngram']['order']}-gram", [report["sets"][n]["ngram"]["bpb"] for n in names]))
    if report.get("baseline"):
        base = report["baseline"]["sets"]
        series.append(("baseline model", [base.get(n, {}).get("model", {}).get("bpb", float("nan")) for n in names]))

    def draw(ax):
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
            bars = ax.bar(xs, values, width, label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("bits per byte (lower is better)")
        ax.set_title("bits per byte")
        ax.legend()

    return _png(draw)


def comparison_png(verdict: dict) -> bytes:
    """Improvement of the candidate over the baseline per rule (green = pass), with the thresholds."""
    checks = [c for c in verdict["checks"] if not c.get("missing")]

    def draw(ax):
        ys = range(len(checks))
        ax.barh(list(ys), [c["improvement"] for c in checks],
                color=["tab:green" if c["passed"] else "tab:red" for c in checks])
        for y, c in zip(ys, checks, strict=True):
            if c["max_regression"] is not None:
                ax.plot([-c["max_regression"]] * 2, [y - 0.4, y + 0.4], "k--")
            if c["min_improvement"] is not None:
                ax.plot([c["min_improvement"]] * 2, [y - 0.4, y + 0.4], "k:")
        ax.set_yticks(list(ys), [c["key"] for c in checks])
        ax.axvline(0, color="grey", linewidth=0.8)
        ax.set_xlabel("improvement over the baseline (--: max regression, ··: min improvement)")
        ax.set_title(f"comparison: {'PASSED' if verdict['passed'] else 'FAILED'}")

    return _png(draw, (7, 1.5 + 0.5 * max(1, len(checks))))


def _num(x) -> str:
    return "–" if x is None else f"{x:,}" if isinstance(x, int) else f"{x:.4f}"


def _language_modelling(report: dict) -> list[str]:
    """The eval sets' section: the model beside the n-gram baseline."""
    lines = ["## Language modelling", "",
             "| set | tokens | bytes | loss | perplexity | bits/byte | top-1 acc | "
             f"{report['ngram']['order']}-gram bits/byte | model's gain over the n-gram (bits/byte) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in report["sets"].items():
        mm, ng = s["model"], s.get("ngram")
        gain = f"{ng['bpb'] - mm['bpb']:.4f}" if ng else "–"
        lines.append(f"| {name} | {mm['tokens']:,} | {mm['bytes']:,} | {mm['loss']:.4f} | {mm['perplexity']:.2f} | "
                     f"{mm['bpb']:.4f} | {mm['accuracy']:.4f} | {_num(ng and ng['bpb'])} | {gain} |")
    lines += [""] + [f"- **{n}**: {s['source']} ({s['rows']:,} rows, {s['backend']}, {s['seconds']:.1f} s)"
                     + (f"; {s['note']}" if s.get("note") else "") for n, s in report["sets"].items()]
    lines += [f"- n-gram baseline: {report['ngram']['note']}", "", "![bits per byte](metrics.png)", ""]
    return lines


def _harness(h: dict, baseline: dict | None) -> list[str]:
    """The lm-evaluation-harness section: per task its metrics (± stderr), beside the baseline's."""
    where = f"endpoint `{h['target']}` (local-completions, tokenizer of `{h['tokenizer']}`)" if (
        h["backend"] == "local-completions") else f"`{h['target']}` (HF backend)"
    lines = ["## lm-evaluation-harness", "", f"lm-eval {h['lm_eval_version']} on {where}, {h['seconds']:.1f} s.", "",
             "| task | items | metric | value | ± stderr | baseline |", "|---|---|---|---|---|---|"]
    for task, metrics in h["tasks"].items():
        base = ((baseline or {}).get("tasks") or {}).get(task, {})
        for key, value in metrics.items():
            if not key.endswith("_stderr"):
                lines.append(f"| {task} | {h['items'][task]} | {key} | {value:.4f} | "
                             f"{_num(metrics.get(key + '_stderr'))} | {_num(base.get(key))} |")
    if c := h.get("check"):
        lines += ["", f"lmforge's own Transformer on the same {c['requests']} requests (lm.eval.likelihood): "
                  f"max |Δ log-likelihood| {c['max_abs_diff']:.2e} nats, {c['greedy_disagreements']} greedy "
                  "disagreements. Every request: `harness_requests.jsonl`."]
    return [*lines, ""]


def markdown(report: dict) -> str:
    """The human-readable report."""
    m = report["model"]
    lines = [f"# Evaluation of `{m['uri']}`", "",
             f"Run `{report['run_uri']}` · {m['parameters']:,} parameters · vocabulary {m['vocab_size']:,} · "
             f"{report['created']} · {report['seconds']:.1f} s", ""]
    if report["sets"]:
        lines += _language_modelling(report)
    if g := report.get("generation"):
        lines += ["## Generation (greedy continuations)", "", "| examples | BLEU | ROUGE-1 | ROUGE-2 | ROUGE-L |",
                  "|---|---|---|---|---|",
                  f"| {g['examples']} | {g['bleu']:.2f} | {g['rouge1']:.4f} | {g['rouge2']:.4f} | {g['rougeL']:.4f} |",
                  ""]
        lines += [f"- `{e['prompt']!r}` → `{e['output']!r}` (reference `{e['reference']!r}`)"
                  for e in g["shown"]] + [""]
    if lab := report.get("labels"):
        lines += ["## Labelled prompts (the model's likeliest label)", "",
                  f"Accuracy {lab['accuracy']:.4f} on {lab['examples']} examples; macro precision "
                  f"{lab['precision_macro']:.4f}, recall {lab['recall_macro']:.4f}, F1 {lab['f1_macro']:.4f}.", "",
                  "| label | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |"
                  for k, v in lab["per_label"].items()] + [""]
    if h := report.get("harness"):
        lines += _harness(h, (report.get("baseline") or {}).get("harness"))
    for name, note in report.get("skipped", {}).items():
        lines += [f"- {name}: skipped ({note})"]
    if report.get("samples"):
        lines += ["## Samples", ""]
        for s in report["samples"]:
            shown = show_documents(s["prompt"] + s["completion"])  # report.json keeps the raw text
            lines += [f"**{s['prompt']!r}**", "", "```", shown, "```", ""]
    lines += ["## Training", "", f"{report['training']['note']}.", ""]
    if "training.png" in report["plots"]:
        lines += ["![training curves](training.png)", ""]
    if v := report.get("comparison"):
        lines += [f"## Comparison with `{report['baseline']['uri']}`: {'PASSED' if v['passed'] else 'FAILED'}", ""]
        lines += [f"- {r}" for r in v["reasons"]] + ["", "![comparison](comparison.png)", ""]
    return "\n".join(lines)


def write_report(store: ObjectStore, out_uri: str, report: dict, curves: Curves,
                 extra: dict[str, str] | None = None) -> str:
    """Render the plots and Markdown, publish everything (and the ``extra`` files: name → text) at
    ``out_uri``; returns the report.md URI."""
    files = {"metrics.png": metrics_png(report)} if report["sets"] else {}
    if curves:
        files["training.png"] = training_png(curves)
    if report.get("comparison"):
        files["comparison.png"] = comparison_png(report["comparison"])
    report["plots"] = sorted(files)
    files["report.md"] = markdown(report).encode()
    files["report.json"] = (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
    files.update({name: text.encode() for name, text in (extra or {}).items()})
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        store.publish_dir(tmp, out_uri)
    return join_uri(out_uri, "report.md")
