"""The summary card ``make demo`` ends with (``lm summary``): what was built, the numbers (validation bits/byte
beside the n-gram baseline, tokens/s, time per stage), where the report, the model, the registry and the
logs are, and the commands to try next. It reads the summary the main job wrote (lm.pipeline.run_main,
``<run>/samples.json``); :func:`card` itself is a pure function of that dict.

    print(card(summary, config="configs/shakespeare-cpu.yaml", registry={...}, sweep={...}))
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from lm.config import Config, join_uri
from lm.storage import ObjectStore


def duration(seconds: float) -> str:
    """``42 s``, ``4 min 10 s``, ``1 h 2 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _quality(ev: dict[str, Any]) -> str | None:
    model, ngram = ev.get("val/bpb"), ev.get("val/ngram_bpb")
    if model is None:
        return None
    line = f"validation {model:.3f} bits/byte"
    if ngram is None:
        return line
    verdict = (f"{ngram - model:.3f} better than" if model < ngram else f"{model - ngram:.3f} behind")
    return f"{line}; n-gram baseline {ngram:.3f}: the model is {verdict} the baseline"


def _built(s: dict[str, Any]) -> str:
    how = "Ray Train + DeepSpeed" + (f" ZeRO-{s['zero_stage']}" if "zero_stage" in s else "")
    if s.get("trainer") == "local":
        how = "the plain loop"
    workers = f", {s['workers']} worker{'s' if s['workers'] != 1 else ''}" if s.get("workers") else ""
    size = f"a {s['params']:,}-parameter GPT" if s.get("params") else "a GPT"
    vocab = f" (BPE vocabulary {s['vocab_size']:,})" if s.get("vocab_size") else ""
    rows = f" on {s['train_rows']:,} rows" if s.get("train_rows") else ""
    return f"{size}{vocab}, {s['steps']:,} steps{rows} with {how}{workers}; loss {s['first_loss']:.3f} → " \
           f"{s['final_loss']:.3f}"


def card(summary: dict[str, Any], *, config: str | None = None, prog: str = "lm", registry: dict | None = None,
         sweep: dict | None = None, logs: str | None = None) -> str:
    """The card, from run_main's ``summary``; ``registry``: ``{"uri", "production", "versions"}``; ``sweep``:
    ``{"results", "best", "trials", "best_line"}``; ``config``: the preset the next commands name."""
    rows: list[tuple[str, str]] = [("built", _built(summary))]
    if quality := _quality(summary.get("eval") or {}):
        rows.append(("quality", quality))
    if summary.get("tokens_per_s"):
        rows.append(("speed", f"{summary['tokens_per_s']:,.0f} tokens/s training"))
    if stages := summary.get("stage_seconds"):
        rows.append(("time", " · ".join(f"{k} {duration(v)}" for k, v in stages.items())))
    if sweep:
        rows.append(("sweep", f"{sweep.get('trials', '?')} trials; best {sweep.get('best_line', '')}".rstrip()))
    rows += [("report", summary["eval_report"]), ("model", summary["model_uri"])]
    if registry:
        prod = registry.get("production")
        rows.append(("registry", f"{registry['uri']} ({registry.get('versions', 0)} versions, production "
                                 f"{prod})" if prod else f"{registry['uri']} (empty: `lm continual` fills it)"))
    if sweep:
        rows.append(("sweep", f"{sweep['results']}; best config {sweep['best']}"))
    if logs:
        rows.append(("logs", logs))
    c = f" -c {config}" if config else ""
    prompt = json.dumps(summary.get("prompt") or "ROMEO:")
    next_commands = [f"{prog} chat{c}", f"{prog} generate{c} --prompt {prompt}", f"{prog} serve{c}",
                     f"{prog} eval{c}", f"{prog} registry list{c}"]
    rows += [("next", next_commands[0]), *(("", cmd) for cmd in next_commands[1:])]
    width = max(len(k) for k, _ in rows)
    title = f"── lmforge: {summary.get('name') or summary['run_uri'].rstrip('/').rsplit('/', 1)[-1]} "
    lines = [title + "─" * max(4, 72 - len(title))]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join([*lines, "─" * 72])


def registry_info(store: ObjectStore, uri: str) -> dict | None:
    """What the card says of the registry at ``uri`` (None: none there)."""
    from lm.registry import Registry

    reg = Registry(store, uri)
    versions = reg.versions()
    if not versions:
        return None
    return {"uri": uri, "production": reg.state().get("aliases", {}).get("production"), "versions": len(versions)}


def sweep_info(store: ObjectStore, sweep: Config) -> dict | None:
    """What the card says of the sweep of ``sweep`` (None: it has no results yet)."""
    from lm.tune.results import sweep_uris

    uris = sweep_uris(sweep.run_uri)
    if not store.exists(uris["results"]):
        return None
    table = list(csv.DictReader(io.StringIO(store.read_text(uris["results"]))))
    metric = sweep.tune.metric
    best = table[0] if table else {}
    values = ", ".join(f"{k}={best[k]}" for k in sweep.tune.space if k in best)
    line = f"{values}: {metric} {float(best[metric]):.4f}" if best.get(metric) else values
    return {"results": uris["results"], "best": uris["best"], "trials": len(table), "best_line": line}


def read_summary(store: ObjectStore, cfg: Config) -> dict[str, Any] | None:
    """The main job's summary of ``cfg``'s run (None: it has not run)."""
    uri = join_uri(cfg.run_uri, "samples.json")
    return json.loads(store.read_text(uri)) if store.exists(uri) else None
