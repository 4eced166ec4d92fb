"""Comparing two models' evaluations on the same sets: a verdict against configurable thresholds.

Metrics are flat ``"<set>/<metric>"`` names (``val/bpb``, ``generation/bleu``, ``labels/f1_macro``,
``harness/lmforge_cloze/acc``, see :func:`flat_metrics`). Each rule (``eval.compare``,
lm.config.eval.CompareRule) names one metric and a ``max_regression`` the candidate may not exceed and/or a
``min_improvement`` it must reach, both in the metric's own units and direction (for bpb lower is better).
The continual-learning gate's "the fixed held-out set must not regress beyond a tolerance; the new data's
set must improve by a margin" is two rules; a harness metric is a rule like any other.

    verdict = compare(flat_metrics(new_report), flat_metrics(old_report), cfg.eval.compare)
    verdict.passed, verdict.reasons, verdict.deltas
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from lm.config.eval import CompareRule

_EPS = 1e-12


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]  # one line per rule, "PASS …" or "FAIL …"
    deltas: dict[str, float]  # candidate − baseline, for every metric both have
    checks: list[dict] = field(default_factory=list)  # per rule: key, candidate, baseline, improvement, passed

    def to_dict(self) -> dict:
        return asdict(self)


def flat_metrics(report: Mapping) -> dict[str, float]:
    """``{"<set>/<metric>": value}`` of a report (lm.eval.report): every set's model metrics (and
    ``ngram_bpb``), the generation scores, the labelled-set scores and every lm-evaluation-harness task's
    metrics as ``harness/<task>/<metric>`` (not their ``_stderr``)."""
    out: dict[str, float] = {}
    for name, entry in (report.get("sets") or {}).items():
        for key, value in entry.get("model", {}).items():
            out[f"{name}/{key}"] = value
        if entry.get("ngram"):
            out[f"{name}/ngram_bpb"] = entry["ngram"]["bpb"]
    for section in ("generation", "labels"):
        for key, value in (report.get(section) or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "examples":
                out[f"{section}/{key}"] = value
    for task, metrics in ((report.get("harness") or {}).get("tasks") or {}).items():
        out.update({f"harness/{task}/{k}": v for k, v in metrics.items() if not k.endswith("_stderr")})
    return {k: float(v) for k, v in out.items()}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def compare(candidate: Mapping[str, float], baseline: Mapping[str, float], rules: Sequence[CompareRule]) -> Verdict:
    """Check every rule (a missing metric fails its rule); the candidate passes when all rules pass."""
    deltas = {k: candidate[k] - baseline[k] for k in sorted(candidate.keys() & baseline.keys())}
    reasons, checks = [], []
    for rule in rules:
        key = rule.key
        if key not in candidate or key not in baseline:
            where = " and ".join(n for n, m in (("candidate", candidate), ("baseline", baseline)) if key not in m)
            reasons.append(f"FAIL {key}: not measured for the {where}")
            checks.append({"key": key, "passed": False, "missing": True})
            continue
        new, old = candidate[key], baseline[key]
        improvement = (new - old) if rule.higher_better else (old - new)
        problems = []
        if rule.max_regression is not None and improvement < -rule.max_regression - _EPS:
            problems.append(f"regressed by {_fmt(-improvement)} > allowed {_fmt(rule.max_regression)}")
        if rule.min_improvement is not None and improvement < rule.min_improvement - _EPS:
            problems.append(f"improved by {_fmt(improvement)} < required {_fmt(rule.min_improvement)}")
        better = "higher" if rule.higher_better else "lower"
        summary = f"{key}: {_fmt(old)} → {_fmt(new)} ({better} is better; improvement {_fmt(improvement)})"
        reasons.append(f"{'FAIL' if problems else 'PASS'} {summary}" + (f": {'; '.join(problems)}" if problems else ""))
        checks.append({"key": key, "candidate": new, "baseline": old, "improvement": improvement,
                       "max_regression": rule.max_regression, "min_improvement": rule.min_improvement,
                       "passed": not problems})
    return Verdict(all(c["passed"] for c in checks), reasons, deltas, checks)
