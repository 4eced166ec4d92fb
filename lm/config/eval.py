"""The ``eval`` section: what ``lm eval`` measures, how it runs, and the thresholds of a comparison.

    eval:
      sets:                                   # each: a split of the run's shards or any text source
        - {name: val, split: val}
        - {name: feedback, uri: s3://bucket/feedback/, format: jsonl}
      compare:                                # candidate vs baseline (the continual-learning gate)
        - {set: val, metric: bpb, max_regression: 0.01}       # the fixed held-out set must not regress
        - {set: feedback, metric: bpb, min_improvement: 0.02}  # the new data must improve by a margin
        - {set: harness, metric: lmforge_cloze/acc, max_regression: 0.05}  # an lm-evaluation-harness metric
      harness: {tasks: [lmforge_cloze, lmforge_who_speaks], limit: 100}   # lm-evaluation-harness tasks
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm.config.base import PATH, PathMarker, Section

BUILTIN_OR_PATH = PathMarker(keep=("builtin",))  # a prompt set: a JSONL URI, or builtin (tinyshakespeare)

# report sections that are not eval sets; their metrics are named "<section>/<metric>" like a set's
RESERVED_SET_NAMES = ("generation", "labels", "harness")
# metric names (the last part of "<task>/<metric>" for harness metrics) where lower is better
LOWER_IS_BETTER = ("loss", "perplexity", "bpb", "ngram_bpb", "ngram_loss", "ngram_perplexity", "word_perplexity",
                   "byte_perplexity", "bits_per_byte")


class EvalSetConfig(Section):
    """One evaluation set: a split of the run's packed shards, or any text source."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Name in the report and in compare rules.")
    split: Literal["train", "val", "test"] | None = Field(
        None, description="A split of the run's shards (data.output / <run>/data); re-tokenized from its text "
        "when the model's tokenizer is not the one the shards were made with. Supervised shards "
        "(data.format: sft) are scored on the responses only, through their loss masks, as training scores them.",
    )
    uri: Annotated[str | None, PATH] = Field(
        None, description="A text source instead: file, folder or glob (local, file://, s3://, bundled://), "
        "read like data.sources (.txt/.jsonl/.parquet, optionally .gz/.zst) and cleaned with data.clean.",
    )
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field("auto", description="For uri: the file format.")
    delimiter: str | None = Field("\n\n", description="For uri, txt: split files into documents on this string.")
    text_field: str = Field("text", description="For uri, jsonl / parquet: the field holding the text.")

    @model_validator(mode="after")
    def _check_one_source(self) -> EvalSetConfig:
        if (self.split is None) == (self.uri is None):
            raise ValueError(f"eval set {self.name!r}: give exactly one of split or uri")
        if self.name in RESERVED_SET_NAMES:
            raise ValueError(f"eval set name {self.name!r} is reserved for a report section")
        return self


class CompareRule(Section):
    """One threshold of a comparison: candidate vs baseline on one metric of one set."""

    set: str = Field("val", description="Eval set name, or 'generation' / 'labels' / 'harness' for those sections.")
    metric: str = Field(
        "bpb", description="Metric of that set: bpb, loss, perplexity, accuracy (sets); bleu, rouge1, rouge2, "
        "rougeL (generation); accuracy, precision_macro, recall_macro, f1_macro (labels); '<task>/<metric>' "
        "(harness: an lm-evaluation-harness task's metric, e.g. lmforge_cloze/acc, lmforge_who_speaks/acc_norm, "
        "lmforge_cloze/perplexity; the task runs even if eval.harness.tasks does not name it).",
    )
    max_regression: float | None = Field(
        None, ge=0, description="Fail if the candidate is worse than the baseline by more than this (absolute).",
    )
    min_improvement: float | None = Field(
        None, description="Fail unless the candidate is better than the baseline by at least this (absolute).",
    )
    higher_is_better: bool | None = Field(
        None, description="Direction of the metric; null = from its name (loss, perplexity, bpb: lower is better).",
    )

    @model_validator(mode="after")
    def _check_threshold(self) -> CompareRule:
        if self.max_regression is None and self.min_improvement is None:
            raise ValueError(f"compare rule {self.set}/{self.metric}: give max_regression and/or min_improvement")
        if self.set == "harness" and not re.fullmatch(r"[^/\s]+/[^/\s]+", self.metric):
            raise ValueError(f"compare rule on harness: metric must be '<task>/<metric>' (e.g. lmforge_cloze/acc), "
                             f"got {self.metric!r}")
        return self

    @property
    def harness_task(self) -> str | None:
        """The lm-evaluation-harness task this rule needs, if it judges one."""
        return self.metric.split("/", 1)[0] if self.set == "harness" else None

    @property
    def key(self) -> str:
        return f"{self.set}/{self.metric}"

    @property
    def higher_better(self) -> bool:
        if self.higher_is_better is not None:
            return self.higher_is_better
        return self.metric.rsplit("/", 1)[-1] not in LOWER_IS_BETTER


class HarnessConfig(Section):
    """EleutherAI lm-evaluation-harness (the ``harness`` extra: ``pip install 'lmforge[harness]'``) on the model
    directory (its Hugging Face backend) or a running lmforge endpoint (``local-completions``)."""

    tasks: list[str] = Field(
        default_factory=list, description="Tasks every `lm eval` runs (`lm eval --harness T1,T2` runs only those). "
        "Shipped: lmforge_cloze (LAMBADA-style: the last word of held-out tinyshakespeare speeches; acc = greedy "
        "agreement, perplexity) and lmforge_who_speaks (which of 4 speakers speaks a held-out line; acc, acc_norm). "
        "Their data is built at run time from the held-out speeches (no download). Other names must be "
        "lm-evaluation-harness tasks whose data is already on this machine (the runs are offline).",
    )
    limit: int = Field(100, ge=1, description="Items per shipped task (evenly spread over the held-out speeches).")
    batch_size: int = Field(16, ge=1, description="Requests per forward pass (HF backend) or per HTTP request "
                            "(endpoint; at most serve.max_prompts).")
    seed: int = Field(1234, description="Draws the 3 wrong speakers of each lmforge_who_speaks item.")
    check: bool = Field(
        True, description="Re-score every request with lmforge's own Transformer (lm.eval.likelihood) and report "
        "the largest |log-likelihood difference| beside the harness's numbers.",
    )


class EvalConfig(Section):
    """Evaluation and reports (lm.eval): ``lm eval``, jobs/evaluate.py and the continual-learning gate."""

    max_batches: int | None = Field(
        None, ge=1, description="Limit each eval set to its first N batches; null = all. Either way a set is "
        "read and scored a bounded piece at a time (a row group of the shards, 256 rows of a text set) and the "
        "sums added up: memory does not grow with the set.",
    )
    batch_size: int = Field(16, ge=1, description="Rows per forward pass when scoring eval sets.")
    sets: list[EvalSetConfig] = Field(
        default_factory=lambda: [EvalSetConfig(name="val", split="val")], min_length=1,
        description="Sets to score (loss, perplexity, bits per byte, top-1 accuracy, n-gram baseline).",
    )
    backend: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: one process; ray: Ray Data actors; auto: ray from ray_min_rows rows up.",
    )
    ray_min_rows: int = Field(
        20_000, ge=1, description="With backend auto, sets of at least this many rows use Ray (a text set is "
        "read up to this many rows, held in memory, to tell).",
    )
    actors: int = Field(2, ge=1, description="Ray backend: scoring actors, each loading the model once.")
    actor_cpus: float = Field(
        0.5, gt=0, description="Ray backend: CPUs per actor (fractional, so Ray Data's read tasks always fit).",
    )
    ngram_order: int = Field(
        3, ge=1, le=8, description="Order of the Kneser-Ney n-gram baseline fitted on the train split; "
        "vocab_size ** order must stay below 2**63.",
    )
    ngram_max_train_tokens: int = Field(
        20_000_000, ge=1, description="Fit the n-gram baseline on at most this many train tokens: the "
        "split's first rows, held in memory (a bounded sample; no shard is read past it).",
    )
    generation_set: Annotated[str | None, BUILTIN_OR_PATH] = Field(
        "builtin", description="JSONL of {prompt, reference} for BLEU / ROUGE; builtin = held-out "
        "tinyshakespeare speeches (prompt: speaker + first line, reference: the next line); null = skip.",
    )
    labelled_set: Annotated[str | None, BUILTIN_OR_PATH] = Field(
        "builtin", description="JSONL of {prompt, label}: the model picks the label it finds likeliest as the "
        "prompt's continuation → precision / recall / F1; builtin = who speaks next in tinyshakespeare "
        "(4 speakers); null = skip.",
    )
    max_examples: int = Field(40, ge=1, description="Use at most this many examples of each of the two sets above.")
    max_new_tokens: int = Field(
        32, ge=1, description="Tokens generated per generation_set prompt (greedy, so scores are reproducible).",
    )
    generation_stop: list[str] = Field(
        default_factory=lambda: ["\n"], description="Generation-set outputs end at the first of these strings.",
    )
    prompts: list[str] = Field(
        default_factory=lambda: ["ROMEO:", "JULIET:\n", "First Citizen:\nWe"],
        description="Qualitative samples in the report, generated with the generate section's settings.",
    )
    harness: HarnessConfig = Field(
        default_factory=HarnessConfig,
        description="lm-evaluation-harness tasks (their metrics: harness/<task>/<metric>).",
    )
    compare: list[CompareRule] = Field(
        default_factory=lambda: [CompareRule(set="val", metric="bpb", max_regression=0.01)],
        description="Thresholds of `lm eval --compare`: every rule must pass for the candidate to pass.",
    )
    output: Annotated[str | None, PATH] = Field(
        None, description="Where report.json, report.md and the PNGs go; null = <run>/eval.")

    @model_validator(mode="after")
    def _check_names(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        if len(set(names)) != len(names):
            raise ValueError(f"eval set names must be unique, got {names}")
        known = [*names, *RESERVED_SET_NAMES]
        if unknown := [r.set for r in self.compare if r.set not in known]:
            raise ValueError(f"compare rules name unknown sets {unknown}; known: {known}")
        return self

    def harness_tasks(self, rules: list[CompareRule] | None = None) -> list[str]:
        """``harness.tasks``, then every other task a compare rule (``rules``, default ``compare``) judges."""
        needed = [r.harness_task for r in (self.compare if rules is None else rules) if r.harness_task]
        return list(dict.fromkeys([*self.harness.tasks, *needed]))
