"""The main job: corpus → data shards + tokenizer → model → evaluation → sample, every artifact under ``cfg.run_uri``.

``lm run`` / ``make demo`` / ``jobs/pipeline.py`` call :func:`run_main`. Each stage is a function of
(config, store) that reads and writes object storage, so the same job runs on a local folder or S3.

    <run>/config.yaml               the resolved config (secrets masked)
    <run>/data/                     manifest.json, tokenizer.json, Parquet shards (lm.data.pipeline)
    <run>/train/{metrics.jsonl,loss.png}
    <run>/model/                    the model directory (lm.modeldir)
    <run>/eval/                     report.md, report.json, PNGs (lm.eval)
    <run>/samples.json              what the trained model wrote, and the run's summary (lm.card prints it)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from lm.config import Config, dump_yaml, join_uri
from lm.data.documents import iter_documents
from lm.data.pipeline import prepare_data
from lm.data.sources import plan_files
from lm.inference import generate_text
from lm.model import num_params
from lm.modeldir import load_model_dir
from lm.progress import Log
from lm.sample_text import show_documents
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer, bytes_per_token, train_tokenizer
from lm.train.distill import check_run_teacher
from lm.train.trainer import train


@dataclass
class TokenizerReport:
    tokenizer: BPETokenizer
    uri: str
    bytes_per_token: float
    seconds: float


def tokenizer_stage(store: ObjectStore, cfg: Config) -> TokenizerReport:
    """Train the BPE tokenizer on the train split and publish ``<run>/tokenizer/tokenizer.json``."""
    start = time.perf_counter()
    tok = train_tokenizer((d.text for d in iter_documents(store, cfg.data, "train")), cfg.tokenizer)
    uri = join_uri(cfg.run_uri, "tokenizer", "tokenizer.json")
    store.publish_file(tok.to_json().encode(), uri)
    held_out = (d.text for d in iter_documents(store, cfg.data, "val" if cfg.data.val_fraction > 0 else "train"))
    return TokenizerReport(tok, uri, bytes_per_token(tok, held_out), time.perf_counter() - start)


def run_main(cfg: Config, store: ObjectStore | None = None, log: Log = print) -> dict:
    """Run the lifecycle as far as it is built; returns a summary (also written to storage)."""
    store = store or ObjectStore(cfg.storage)
    log(f"run {cfg.name} → {cfg.run_uri}")
    plan_files(store, cfg.data)  # fail before any work if a source is missing
    check_run_teacher(cfg, store)  # or train.distill.teacher is no model directory with the context
    store.write_text(join_uri(cfg.run_uri, "config.yaml"), dump_yaml(cfg))

    seconds: dict[str, float] = {}  # per stage, for the summary card (lm.card)
    start = time.perf_counter()
    manifest = prepare_data(cfg, store, log)
    seconds["data"] = time.perf_counter() - start
    tok = BPETokenizer.from_json(store.read_text(manifest.tokenizer_uri(cfg.data_uri)))
    log(f"data: {manifest.rows_in('train'):,} train rows, "
        f"{manifest.rows_in('val'):,} validation rows of {manifest.row_length} tokens; "
        f"{tok.vocab_size} tokens in the vocabulary")

    model_uri = join_uri(cfg.run_uri, "model")
    vocab = max(cfg.model.vocab_size, tok.vocab_size)  # as lm.train.weights.build_model sizes it
    params = num_params(cfg.model.model_copy(update={"vocab_size": vocab}))
    if cfg.train.trainer == "ray":  # (the local trainer says it itself)
        log(f"model: {params:,} parameters; Ray Train + DeepSpeed")
    start = time.perf_counter()
    result = train(cfg, store, log, prepare=False)  # the data is prepared: above
    seconds["train"] = time.perf_counter() - start
    from lm.eval.evaluate import evaluate

    start = time.perf_counter()
    evaluation = evaluate(cfg, store, model_uri, log)
    seconds["eval"] = time.perf_counter() - start
    start = time.perf_counter()
    loaded = load_model_dir(store, model_uri)
    sample = generate_text(loaded.model, loaded.tokenizer, [cfg.generate.prompt], cfg.generate)[0]
    seconds["sample"] = time.perf_counter() - start
    summary = {
        "name": cfg.name, "run_uri": cfg.run_uri, "model_uri": model_uri, "params": params,
        "vocab_size": tok.vocab_size, "train_rows": manifest.rows_in("train"), "steps": result.steps,
        "train_seconds": round(result.seconds, 1), "first_loss": result.history[0]["loss"],
        "final_loss": result.history[-1]["loss"], "val_loss": result.history[-1].get("val_loss"),
        "tokens_per_s": tokens_per_s(result.history), "workers": cfg.train.min_workers,
        "zero_stage": cfg.train.zero_stage, "trainer": cfg.train.trainer,
        "stage_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "eval_report": evaluation.report_uri, "eval": evaluation.metrics,
        "prompt": cfg.generate.prompt, "sample": sample,
    }
    store.write_text(join_uri(cfg.run_uri, "samples.json"), json.dumps(summary, indent=2))
    log(f"sample:\n{show_documents(cfg.generate.prompt + sample, loaded.tokenizer.eos_token)}")
    return summary


def tokens_per_s(history: list[dict]) -> float | None:
    """Training throughput of a run: the median of its records' tokens/s (None: none measured)."""
    rates = sorted(r["tokens_per_s"] for r in history if r.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None
