"""What the console's operators' view shows, read from object storage (no FastAPI, no Ray): the registry
(lm.registry: versions, aliases), a version's gate report (lm.eval.report's ``report.json`` and its PNGs),
the continual-learning iterations (lm.continual.ledger) and the training curves of a version's run
(lm.eval.report.training_curves: TensorBoard logs or ``train/metrics.jsonl``).

    registry_view(reg)                        # {"aliases", "versions": [...]}
    report_view(store, reg.get("v000002"))    # {"version", "report", "metrics", "comparison", "plots"}
    plot_bytes(store, version, "comparison.png")
    iterations_view(store, registry_uri)      # [{"n", "inputs", "claimed_at", "outcome"}]
    training_view(store, reg.get("production"))
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from typing import Any

from lm.config import join_uri
from lm.registry import Registry, Version
from lm.storage import ObjectStore, StorageNotFound

MAX_POINTS = 300  # per training curve: the page draws at most this many points
PLOT = re.compile(r"^[\w.-]+\.png$")


class NotFound(LookupError):
    """What was asked for is not there (the route answers 404)."""


def registry_view(reg: Registry) -> dict[str, Any]:
    """The registry's versions (newest first) with status, parent, creation time, and its aliases."""
    state = reg.state()
    versions = [{k: v for k, v in asdict(ver).items() if k not in ("metrics", "data_manifest")}
                for ver in reversed(reg.versions())]
    return {"uri": reg.uri, "aliases": state.get("aliases", {}), "versions": versions}


def _report_folder(version: Version) -> str | None:
    return version.gate_report.rsplit("/", 1)[0] if version.gate_report else None


def report_view(store: ObjectStore, version: Version) -> dict[str, Any]:
    """A version's gate report: its metrics, the comparison's verdict and checks, the plots it has."""
    out: dict[str, Any] = {"version": version.id, "status": version.status, "reason": version.reason,
                           "metrics": version.metrics, "report": version.gate_report, "iteration": version.iteration,
                           "comparison": None, "sets": {}, "plots": []}
    folder = _report_folder(version)
    if folder is None:
        return out
    try:
        report = json.loads(store.read_text(join_uri(folder, "report.json")))
    except StorageNotFound:
        return {**out, "note": f"no report.json beside {version.gate_report}"}
    out["comparison"] = report.get("comparison")
    out["baseline"] = (report.get("baseline") or {}).get("uri")
    out["sets"] = {name: {k: s["model"].get(k) for k in ("bpb", "loss", "perplexity", "accuracy")}
                   for name, s in (report.get("sets") or {}).items()}
    out["plots"] = [p for p in report.get("plots", []) if PLOT.match(p)]
    return out


def plot_bytes(store: ObjectStore, version: Version, name: str) -> bytes:
    """One PNG of a version's gate report (only those its report.json lists)."""
    if name not in report_view(store, version)["plots"]:
        raise NotFound(f"version {version.id}'s gate report has no plot {name!r}")
    return store.read_bytes(join_uri(_report_folder(version), name))


def iterations_view(store: ObjectStore, registry_uri: str) -> list[dict[str, Any]]:
    """The continual-learning iterations (newest first): inputs taken, when, and how each ended."""
    from lm.continual.ledger import Ledger, continual_root

    ledger = Ledger(store, continual_root(registry_uri))
    out = []
    for it in reversed(ledger.iterations()):
        outcome = it.get("outcome") or {}
        out.append({"n": it["n"], "claimed_at": it.get("claimed_at"), "inputs": sorted(it.get("inputs", {})),
                    "outcome": {k: outcome.get(k) for k in ("verdict", "version", "parent", "reasons", "report",
                                                            "rows")} if outcome else None})
    return out


def run_uri_of(store: ObjectStore, model_uri: str) -> str:
    """The run that made a model directory: its lineage's ``<run>/train/config.json``, else the folder holding
    the model directory (``<run>/model``, lm.train.publish)."""
    try:
        lineage = json.loads(store.read_text(join_uri(model_uri, "lineage.json")))
    except (StorageNotFound, ValueError):
        lineage = {}
    config = lineage.get("config") or ""
    if config.endswith("/train/config.json"):
        return config[: -len("/train/config.json")]
    return model_uri.rstrip("/").rsplit("/", 1)[0]


def _thin(points: list[tuple[int, float]]) -> list[list[float]]:
    step = max(1, -(-len(points) // MAX_POINTS))
    kept = points[::step] + ([points[-1]] if (len(points) - 1) % step else [])
    return [[s, v] for s, v in kept]


def training_view(store: ObjectStore, version: Version) -> dict[str, Any]:
    """The training curves (tag → [[step, value]]) of the run that made ``version``'s model."""
    from lm.eval.report import training_curves

    run_uri = run_uri_of(store, version.model_uri)
    curves, note = training_curves(store, run_uri)
    return {"version": version.id, "run": run_uri, "note": note,
            "curves": {tag: _thin(points) for tag, points in sorted(curves.items()) if points}}
