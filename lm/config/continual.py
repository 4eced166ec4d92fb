"""The ``continual`` section: what one continual-learning iteration (lm.continual) reads, how it
fine-tunes, and the gate a candidate must pass to be promoted.

    continual:
      corpus: [{name: incoming, uri: s3://bucket/incoming/}]   # new documents land here
      replay_ratio: 0.5          # half of every fine-tuning batch is earlier training data
      steps: 100
      gate:
        - {set: fixed, metric: bpb, max_regression: 0.02}     # the fixed held-out set must not regress
        - {set: new, metric: bpb, min_improvement: 0.01}      # the new data's held-out part must improve
        - {set: harness, metric: lmforge_cloze/acc, max_regression: 0.05}   # an lm-evaluation-harness task
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm.config.base import PATH, Section
from lm.config.eval import CompareRule
from lm.config.sources import SourceConfig

GATE_SETS = ("fixed", "new", "harness")


def _default_gate() -> list[CompareRule]:
    return [CompareRule(set="fixed", metric="bpb", max_regression=0.02),
            CompareRule(set="new", metric="bpb", min_improvement=0.01)]


class ContinualConfig(Section):
    """Continuous learning: new documents and served feedback → fine-tune production → gate → promote."""

    registry: Annotated[str | None, PATH] = Field(
        None, description="The model registry (a folder or s3:// URI, lm.registry); null = <storage.root>/registry."
    )
    corpus: list[SourceConfig] = Field(
        default_factory=list, description="Where new documents arrive (sources as in data.sources); every object "
        "is learned from once: the ledger records its key and ETag (an object rewritten in place is new again).",
    )
    use_feedback: bool = Field(True, description="Learn from the feedback logs Serve writes (serve.feedback.uri).")
    feedback_as: Literal["sft", "text"] = Field(
        "sft", description="Feedback pairs become supervised examples (loss on the response only, sft) or plain "
        "text documents (prompt + response, text).",
    )
    use_unrated: bool = Field(
        False, description="Also learn from completions nobody rated (else: rated 1 or corrected).",
    )
    replay_ratio: float = Field(
        0.5, ge=0, lt=1, description="Share of the fine-tuning rows drawn from the production model's training "
        "data (against forgetting); 0.5 = one earlier row per new row.",
    )
    steps: int = Field(100, ge=1, description="Fine-tuning optimizer steps per iteration.")
    lr: float = Field(3e-4, gt=0, description="Fine-tuning peak learning rate (train.* gives everything else; "
                      "with optimizer muon, muon_lr is scaled by continual.lr / train.lr).")
    warmup_steps: int = Field(10, ge=0, description="Fine-tuning warm-up steps.")
    gate: list[CompareRule] = Field(
        default_factory=_default_gate, min_length=1, description="Candidate vs production on the sets 'fixed' "
        "(the validation split of the original data, data.output) and 'new' (the held-out part of this "
        "iteration's new data), and 'harness' (metric '<task>/<metric>': an lm-evaluation-harness task run on "
        "both, e.g. lmforge_cloze/acc); every rule must pass for promotion.",
    )
    interval_s: float = Field(600.0, gt=0, description="`lm continual --watch`: seconds between iterations.")

    @model_validator(mode="after")
    def _check(self) -> ContinualConfig:
        names = [s.name for s in self.corpus]
        if len(set(names)) != len(names):
            raise ValueError(f"continual.corpus source names must be unique, got {names}")
        if unknown := [r.set for r in self.gate if r.set not in GATE_SETS]:
            raise ValueError(f"continual.gate rules name unknown sets {unknown}; the gate's sets are {list(GATE_SETS)}")
        return self
