"""A finished (or partly finished) sweep as files people read: the results table, every trial's
validation curve as PNG, and the best trial's config as a ready-to-run training preset.

Pure functions of plain data (no Ray): :func:`lm.tune.sweep.tune` turns Tune's results into
:class:`TrialRecord` s and calls these.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from lm.config import Config, join_uri, with_overrides


@dataclass
class TrialRecord:
    """One trial: its searched values, every evaluation it reported and how it ended."""

    trial_id: str
    params: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)  # the reported results, in order
    error: str | None = None

    def best(self, metric: str, mode: str) -> dict[str, Any] | None:
        """The reported result with the best ``metric`` (None if it never reported one)."""
        scored = [r for r in self.history if _is_number(r.get(metric))]
        if not scored:
            return None
        pick = min if mode == "min" else max
        return pick(scored, key=lambda r: r[metric])

    def last_step(self) -> int:
        return max((int(r.get("step", 0)) for r in self.history), default=0)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def results_table(trials: list[TrialRecord], metric: str, mode: str, max_steps: int):
    """A pandas DataFrame, one row per trial, best first: the searched values, the best ``metric`` and
    the step it was reached at, the last step and how the trial ended."""
    import pandas as pd

    rows = []
    for trial in trials:
        best = trial.best(metric, mode) or {}
        last = trial.last_step()
        if trial.error:
            ended = "error"
        elif last >= max_steps:
            ended = "finished"
        elif trial.history:
            ended = "stopped early"
        else:
            ended = "no result"
        rows.append({"trial_id": trial.trial_id, **trial.params, metric: best.get(metric),
                     "at_step": best.get("step"), "last_step": last, "ended": ended,
                     **({"error": trial.error} if trial.error else {})})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(metric, ascending=mode == "min", na_position="last", kind="stable").reset_index(drop=True)


def curves_png(trials: list[TrialRecord], metric: str, title: str) -> bytes:
    """Every trial's ``metric`` against step (one line each; trials stopped early end early)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for trial in trials:
        points = [(r["step"], r[metric]) for r in trial.history if "step" in r and _is_number(r.get(metric))]
        if points:
            steps, values = zip(*points, strict=True)
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in trial.params.items()) or trial.trial_id
            ax.plot(steps, values, "o-", markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 8 else 1)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def best_config(base: Config, params: dict[str, Any], data_uri: str) -> Config:
    """The base config with the best trial's values: a training run of its own (``<name>-best``) on the
    sweep's data shards, with no search section."""
    cfg = with_overrides(base, params, "best trial:")
    return cfg.model_copy(update={"name": f"{base.name}-best", "output": None, "tune": type(base.tune)(),
                                  "data": cfg.data.model_copy(update={"output": data_uri})})


def config_yaml(cfg: Config, header: str) -> str:
    """``cfg`` as a YAML preset with a comment header; secrets are left out (they come from the
    environment), so the file loads as it is."""
    tree = cfg.public_dict()
    storage = tree["storage"]
    for key in ("access_key_id", "secret_access_key"):
        if storage.get(key) is not None:
            storage[key] = None
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)


def sweep_uris(run_uri: str) -> dict[str, str]:
    """Where a sweep's outputs live under its run."""
    tune_uri = join_uri(run_uri, "tune")
    return {"tune": tune_uri, "trials": join_uri(tune_uri, "trials"), "ray": join_uri(tune_uri, "ray"),
            "results": join_uri(tune_uri, "results.csv"), "curves": join_uri(tune_uri, "curves.png"),
            "best": join_uri(tune_uri, "best.yaml")}
