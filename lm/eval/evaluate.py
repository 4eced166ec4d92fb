"""The whole evaluation of a model directory: what ``lm eval``, jobs/evaluate.py, the demo and the
continual-learning gate call.

    result = evaluate(cfg)                                   # <run>/model on cfg.eval.sets → <run>/eval/
    result = evaluate(cfg, model_uri=new, compare_to=old)    # old: a model directory or a report.json
    result.report_uri, result.metrics["val/bpb"], result.verdict.passed

For every eval set (lm.eval.sets): loss, perplexity, bits per byte and top-1 accuracy of the model, and
bits per byte of the n-gram baseline fitted on the run's train split (lm.eval.ngram), on one process or,
from ``eval.ray_min_rows`` rows up (``eval.backend``), on Ray Data actors (lm.eval.distributed); either
way a set is scored a bounded piece at a time and the sums added up, so memory does not grow with it. Then
BLEU / ROUGE, label-choice precision / recall / F1 and samples (lm.eval.generation); with
``compare_to``, the baseline is measured on the same sets and judged by ``eval.compare``
(lm.eval.compare). With harness tasks (``eval.harness.tasks``, any a compare rule judges, or ``lm eval
--harness``), lm-evaluation-harness runs them on the model directory or an endpoint (lm.eval.harness): metrics
``harness/<task>/<metric>``. Everything lands in ``eval.output`` (default ``<run>/eval/``, lm.eval.report).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain

from lm.config import Config, join_uri
from lm.config.eval import EvalConfig, EvalSetConfig
from lm.data.sources import DataError
from lm.eval.compare import Verdict, compare, flat_metrics
from lm.eval.generation import generation_scores, label_scores, samples
from lm.eval.metrics import TokenSums, score_rows, token_byte_lengths
from lm.eval.ngram import NGramLM
from lm.eval.report import training_curves, write_report
from lm.eval.sets import EvalRows, Piece, load_set, ngram_train_rows, prompt_set
from lm.modeldir import LoadedModel, load_model_dir
from lm.progress import Log, end_stages, stage
from lm.storage import ObjectStore

FORMAT = "lmforge.eval/1"
logger = logging.getLogger("lmforge.eval")  # → the run's log file (lm.logfile)


@dataclass
class EvalResult:
    report: dict
    metrics: dict[str, float]  # "<set>/<metric>" (lm.eval.compare.flat_metrics)
    report_uri: str  # report.md
    json_uri: str  # report.json
    verdict: Verdict | None
    seconds: float


def _ngram(cfg: Config, store: ObjectStore, loaded: LoadedModel, seq_len: int, cache: dict):
    """The n-gram baseline for this model's tokenizer (fitted once per tokenizer), and what it is."""
    key = (loaded.tokenizer.fingerprint(), loaded.model.cfg.vocab_size)
    if key not in cache:
        start = time.perf_counter()
        rows, note = ngram_train_rows(store, cfg, loaded.tokenizer, seq_len, cfg.eval.ngram_max_train_tokens)
        order = cfg.eval.ngram_order
        lm = NGramLM.fit(rows, order, loaded.model.cfg.vocab_size) if rows is not None else None
        seconds = time.perf_counter() - start
        logger.info("eval: %s-gram baseline %s [%.1f s]", order, note, seconds)  # the sets' lines show its scores
        cache[key] = (lm, {"order": order, "note": note, "fit_seconds": round(seconds, 2)})
    return cache[key]


def _backend(ev: EvalConfig, found: EvalRows) -> tuple[str, Iterator[Piece]]:
    """The backend for a set (``eval.backend``; auto: ray from ``ray_min_rows`` rows up) and its pieces. A
    set of unknown size (a text set) is read up to ``ray_min_rows`` rows to decide: held, bounded by that."""
    if ev.backend != "auto":
        return ev.backend, found.pieces
    if found.n_rows is not None:
        return ("ray" if found.n_rows >= ev.ray_min_rows else "local"), found.pieces
    head, have = [], 0
    for piece in found.pieces:
        head.append(piece)
        have += len(piece)
        if have >= ev.ray_min_rows:
            return "ray", chain(head, found.pieces)
    return "local", iter(head)


def _local_sums(loaded: LoadedModel, pieces: Iterable[Piece], batch_size: int,
                ngram: NGramLM | None) -> tuple[dict[str, TokenSums], int]:
    """Token sums of every piece, added up (memory holds one piece, whatever the set's size), and the rows."""
    table = token_byte_lengths(loaded.tokenizer, loaded.model.cfg.vocab_size)
    sums = {"model": TokenSums(), **({"ngram": TokenSums(correct=None)} if ngram is not None else {})}
    rows = 0
    for piece in pieces:
        for key, part in score_rows(loaded.model, piece.rows, table, batch_size, ngram,
                                    loss_mask=piece.loss_mask).items():
            sums[key] = sums[key] + part
        rows += len(piece)
    return sums, rows


def _score_set(cfg: Config, store: ObjectStore, model_uri: str, loaded: LoadedModel, spec: EvalSetConfig,
               seq_len: int, ngram: NGramLM | None, log: Log) -> dict:
    ev = cfg.eval
    start = time.perf_counter()
    max_rows = ev.max_batches * ev.batch_size if ev.max_batches else None
    found = load_set(store, cfg, spec, loaded.tokenizer, seq_len, max_rows)
    backend, pieces = _backend(ev, found)
    if backend == "ray":
        from lm.eval.distributed import ray_sums

        where = {"shard_uris": found.shard_uris, "masked": found.masked} if found.shard_uris else {"pieces": pieces}
        sums, n_rows = ray_sums(store, model_uri, batch_size=ev.batch_size, actors=ev.actors,
                                actor_cpus=ev.actor_cpus, ngram=ngram, **where)
    else:
        sums, n_rows = _local_sums(loaded, pieces, ev.batch_size, ngram)
    seconds = time.perf_counter() - start
    model: TokenSums = sums["model"]
    entry = {"source": found.source, "rows": n_rows, "backend": backend, "seconds": round(seconds, 2),
             "note": found.note, "model": model.metrics(),
             "ngram": sums["ngram"].metrics() if "ngram" in sums else None}
    ng = f" | n-gram {entry['ngram']['bpb']:.3f} bpb" if entry["ngram"] else ""
    m = entry["model"]
    log(f"eval {spec.name}: {n_rows:,} rows ({backend}) loss {m['loss']:.4f} ppl {m['perplexity']:.1f} "
        f"{m['bpb']:.3f} bpb top-1 {m['accuracy']:.3f}{ng} [{seconds:.1f} s]")
    return entry


def _prompt_metrics(cfg: Config, store: ObjectStore, loaded: LoadedModel, log: Log) -> dict:
    ev, model, tok = cfg.eval, loaded.model, loaded.tokenizer
    out: dict = {"skipped": {}}
    for section, uri in (("generation", ev.generation_set), ("labels", ev.labelled_set)):
        if uri is None:
            out["skipped"][section] = "not configured"
            continue
        start = time.perf_counter()
        examples = prompt_set(store, cfg, uri, "generation" if section == "generation" else "labelled", ev.max_examples)
        if not examples:
            out["skipped"][section] = f"{uri}: no examples"
            continue
        try:
            if section == "generation":
                scores = generation_scores(model, tok, examples, ev.max_new_tokens, ev.generation_stop)
                summary = f"BLEU {scores['bleu']:.2f} ROUGE-L {scores['rougeL']:.3f}"
            else:
                scores = label_scores(model, tok, examples)
                summary = f"accuracy {scores['accuracy']:.3f} macro F1 {scores['f1_macro']:.3f}"
        except ValueError as err:
            raise DataError(f"eval {section} set {uri}: {err}") from None
        out[section] = {**scores, "set": uri}
        log(f"eval {section}: {len(examples)} examples, {summary} [{time.perf_counter() - start:.1f} s]")
    out["samples"] = samples(model, tok, ev.prompts, cfg.generate)
    return out


def measure(cfg: Config, store: ObjectStore, model_uri: str, log: Log = print, ngram_cache: dict | None = None,
            harness_only: bool = False, endpoint: str | None = None) -> dict:
    """Every metric of one model directory (the report's model part: model, ngram, sets, generation, …, and
    ``harness`` when harness tasks are configured or judged; the run itself under ``harness_run``, for its
    requests). ``harness_only``: only those; ``endpoint``: the harness scores that lmforge endpoint instead
    (the directory gives the tokenizer)."""
    loaded = load_model_dir(store, model_uri)
    model = {"uri": model_uri, "parameters": loaded.model.num_parameters(), "vocab_size": loaded.model.cfg.vocab_size,
             "tokenizer_hash": loaded.tokenizer.fingerprint(), "lineage": loaded.lineage}
    out: dict = {"model": model, "ngram": None, "sets": {}}
    if not harness_only:
        seq_len = min(cfg.seq_len, loaded.model.cfg.max_seq_len)
        ngram, out["ngram"] = _ngram(cfg, store, loaded, seq_len, {} if ngram_cache is None else ngram_cache)
        out["sets"] = {spec.name: _score_set(cfg, store, model_uri, loaded, spec, seq_len, ngram, log)
                       for spec in cfg.eval.sets}
        out.update(_prompt_metrics(cfg, store, loaded, log))
    if tasks := cfg.eval.harness_tasks():
        from lm.eval.harness.run import run_harness

        run = run_harness(cfg, store, model_uri, tasks, endpoint, log)
        out.update(harness=run.report_entry(), harness_run=run)
    elif harness_only:
        raise DataError("no harness tasks to run (lm eval --harness TASK, or eval.harness.tasks)")
    return out


def _baseline(cfg: Config, store: ObjectStore, uri: str, cache: dict, harness_only: bool) -> dict:
    """The baseline's report part: read from a report.json, or measured now on the same sets."""
    if uri.endswith(".json"):
        report = json.loads(store.read_text(uri))
        if report.get("format") != FORMAT:
            raise DataError(f"{uri}: not an lmforge evaluation report (format {report.get('format')!r})")
        return {**report, "uri": report["model"]["uri"], "report": uri}
    stage(f"eval: measuring the baseline {uri} on the same sets")  # the comparison's lines show its numbers
    try:
        measured = measure(cfg, store, uri, stage, cache, harness_only)
    finally:
        end_stages()
    measured.pop("harness_run", None)
    return {**measured, "uri": uri}


def evaluate(cfg: Config, store: ObjectStore | None = None, model_uri: str | None = None, log: Log = print,
             compare_to: str | None = None, harness_only: bool = False, endpoint: str | None = None) -> EvalResult:
    """Evaluate ``model_uri`` (default ``<run>/model``), optionally against ``compare_to``; publish the report.
    ``harness_only``: only the lm-evaluation-harness tasks; ``endpoint``: they score that running lmforge
    endpoint (``http://host:port/v1``, serving ``model_uri``) instead of the directory (see :func:`measure`)."""
    start = time.perf_counter()
    store = store or ObjectStore(cfg.storage)
    model_uri = model_uri or join_uri(cfg.run_uri, "model")
    cache: dict = {}
    report = {"format": FORMAT, "created": time.strftime("%Y-%m-%d %H:%M:%S"), "run_uri": cfg.run_uri,
              "config_hash": cfg.fingerprint(), **measure(cfg, store, model_uri, log, cache, harness_only, endpoint)}
    harness_run = report.pop("harness_run", None)
    verdict = None
    if compare_to:
        baseline = _baseline(cfg, store, compare_to, cache, harness_only)
        report["baseline"] = {k: baseline.get(k) for k in ("uri", "report", "model", "sets", "generation", "labels",
                                                             "harness")}
        verdict = compare(flat_metrics(report), flat_metrics(baseline), cfg.eval.compare)
        report["comparison"] = verdict.to_dict()
        log(f"eval: comparison with {compare_to}: {'PASSED' if verdict.passed else 'FAILED'}")
        for reason in verdict.reasons:
            log(f"  {reason}")
    curves, note = training_curves(store, cfg.run_uri)
    report["training"] = {"note": note, "final": {tag: points[-1][1] for tag, points in curves.items() if points}}
    report["seconds"] = round(time.perf_counter() - start, 2)
    out = cfg.eval.output or join_uri(cfg.run_uri, "eval")
    extra = {"harness_requests.jsonl": "".join(r.model_dump_json() + "\n" for r in harness_run.requests)
             } if harness_run else {}
    report_uri = write_report(store, out, report, curves, extra)
    log(f"eval: report → {report_uri}")
    return EvalResult(report, flat_metrics(report), report_uri, join_uri(out, "report.json"), verdict,
                      report["seconds"])
