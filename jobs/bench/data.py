"""Benchmark the data pipeline (issue 16, proofs 2 and 3): its throughput against one process doing the
same work, and its memory as the corpus grows.

    tests/isolated .venv/bin/python jobs/bench/data.py --mb 100              # throughput → results/data.json
    tests/isolated .venv/bin/python jobs/bench/data.py --sizes 20,200        # memory → results/data_memory.json

Builds a corpus of at least --mb MB from the bundled tinyshakespeare (each document is 4-15 lines
drawn at random, so documents are not near-duplicates of each other), then measures
  * pipeline: `lm data prepare` (read, clean, split, exact + near dedup, tokenizer, corpus index,
    tokenize, pack, write) in a fresh local Ray, with the peak memory of the driver, of each Ray worker
    process (USS, by role), of the object store and the bytes it spilled (jobs/bench/memory.py);
  * one process: the same stages, functions and settings without Ray (:func:`one_process`; it must write
    as many tokens as the pipeline, or the run fails);
  * baselines: one process reading the same files and tokenizing them with ``encode_batch``, once with
    every core (the `tokenizers` default) and once on one thread.
``--sizes`` runs the pipeline alone at each size, each in a fresh process. Writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from itertools import pairwise
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from memory import Sampler
from results_io import machine, write_result

from lm.config import join_uri, load_config
from lm.data.dedup import (
    _GROUP,
    _candidate_buckets,
    _keep_smallest_ids,
    band_keys,
    bucket_edges,
    connected_components,
    index_rows,
    minhash_batch,
)
from lm.data.pipeline import prepare_data
from lm.data.sources import plan_files, read_file_task
from lm.data.steps import TokenizeActor, add_bucket, hash_sample, read_and_clean, write_shard
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer, train_tokenizer


def build_corpus(folder: Path, megabytes: float, files: int, seed: int = 0) -> int:
    with gzip.open(Path(__file__).parents[2] / "lm/corpora/tinyshakespeare.txt.gz", "rt") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rng = np.random.default_rng(seed)
    target = int(megabytes * 1e6 / files)
    total = 0
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        parts, size = [], 0
        while size < target:
            picks = rng.integers(0, len(lines), size=int(rng.integers(4, 16)))  # unrelated lines: no near-dups
            doc = "\n".join(lines[i] for i in picks) + f"\n-- {f}.{len(parts)}"
            parts.append(doc)
            size += len(doc.encode()) + 2
        (folder / f"part-{f:03d}.txt").write_text("\n\n".join(parts))
        total += size
    return total


def baseline_mb_s(folder: Path, tok: BPETokenizer, threads: str) -> tuple[float, float]:
    """One process reading the files and tokenizing them with ``encode_batch``; ``threads="all"`` lets
    `tokenizers` use every core (its default), ``"one"`` sets TOKENIZERS_PARALLELISM=false."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads == "all" else "false"
    try:
        start, n_bytes = time.perf_counter(), 0
        for path in sorted(folder.glob("*.txt")):
            docs = path.read_text().split("\n\n")
            n_bytes += sum(len(d.encode()) for d in docs)
            for i in range(0, len(docs), 1000):
                tok.tokenizer.encode_batch(docs[i : i + 1000], add_special_tokens=False)
        seconds = time.perf_counter() - start
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return n_bytes / 1e6 / seconds, seconds


def one_process(cfg, store: ObjectStore) -> tuple[float, dict[str, float], int]:
    """The pipeline's stages in this process, without Ray, on the same files and settings: the same functions
    (read_and_clean, exact dedup's smallest-id rule, MinHash + LSH buckets + verification, the tokenizer's
    seeded sample, the corpus index's signatures (computed, not written), TokenizeActor, pack + write_shard
    into a folder), each stage over the whole corpus in memory (a baseline for Ray's overhead, not a way to
    run lmforge).
    Returns the seconds, the seconds per stage and the tokens written."""
    stages, start = {}, time.perf_counter()
    last = [start]

    def done(stage: str) -> None:
        stages[stage], last[0] = round(time.perf_counter() - last[0], 1), time.perf_counter()

    data = cfg.data
    read = partial(read_file_task, filesystem_factory=store.pyarrow_filesystem, clean=data.clean,
                   max_file_bytes=int(data.max_file_mb * 2**20))
    split = {"val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
             "fixed": {s.name: s.split for s in data.sources if s.split}}
    rows = pa.concat_tables(pa.table(b) for f in plan_files(store, data) for b in read_and_clean(
        {k: [v] for k, v in f.items()}, read=read, cfg=data.clean, split=split))
    docs = rows.filter(pc.equal(rows.column("reason"), ""))
    done("read and cleaned")
    docs = _keep_smallest_ids(docs.append_column(_GROUP, docs.column("hash")))
    done("exact dedup")
    docs = _near_dedup_here(docs, data.dedup)
    done("near dedup")
    train = docs.filter(pc.equal(docs.column("split"), "train"))
    fraction = min(1.0, cfg.tokenizer.max_train_bytes / max(pc.sum(train.column("n_bytes")).as_py(), 1))
    sample = hash_sample(train, data.seed, fraction).sort_by("id") if fraction < 1 else train.sort_by("id")
    tok = train_tokenizer(sample.column("text").to_pylist(), cfg.tokenizer)
    done("tokenizer trained")
    for i in range(0, docs.num_rows, 1024):
        index_rows(docs.slice(i, 1024).select(["hash", "text"]).to_pydict(), data.dedup)
    done("wrote the corpus index")
    tokenize = TokenizeActor(tok.to_json(), {s.name: s.weight for s in data.sources})
    tokens = pa.concat_tables(tokenize({k: np.asarray(v, dtype=object)
                                        for k, v in docs.slice(i, 1024).to_pydict().items()})
                              for i in range(0, docs.num_rows, 1024))
    done("tokenized")
    n_tokens = _pack_here(tokens, cfg, store, tok)
    done("packed and wrote")
    return time.perf_counter() - start, stages, n_tokens


def _near_dedup_here(docs: pa.Table, dedup) -> pa.Table:
    """near_dedup's maths in one process: signatures, band keys, buckets of 2+, verified, smallest id kept."""
    sigs = np.concatenate([minhash_batch(docs.column("text").slice(i, 1024).to_pylist(), dedup)
                           for i in range(0, docs.num_rows, 1024)])
    keys = band_keys(sigs, dedup.bands).reshape(-1)
    rows = pa.table({"band_key": keys, "id": np.repeat(np.asarray(docs.column("id").to_pylist(), dtype=object),
                                                        dedup.bands)})
    buckets = [m for t in _candidate_buckets(rows) for m in t.column("members").to_pylist()]
    position = {x: i for i, x in enumerate(docs.column("id").to_pylist())}
    edges = {e for b in buckets for e in bucket_edges(b, sigs[[position[x] for x in b]], dedup.threshold)}
    drop = {x for x, rep in connected_components(sorted(edges)).items() if x != rep}
    return docs.filter(pa.array([x not in drop for x in position]))


def _pack_here(tokens: pa.Table, cfg, store: ObjectStore, tok: BPETokenizer) -> int:
    """The shard writer's groups, (split, bucket), packed and written into <storage.root>/one-process;
    returns the tokens written (the pipeline's manifest must count as many)."""
    totals, written = {}, 0
    for split, n in zip(tokens.column("split").to_pylist(), tokens.column("n_tokens").to_pylist(), strict=True):
        totals[split] = totals.get(split, 0) + n
    per_split = {s: max(1, math.ceil(n / (cfg.seq_len + 1) / cfg.data.rows_per_shard)) for s, n in totals.items()}
    tokens = add_bucket(tokens, per_split)
    for split, bucket in sorted(set(zip(tokens.column("split").to_pylist(), tokens.column("bucket").to_pylist(),
                                        strict=True))):
        group = tokens.filter(pc.and_(pc.equal(tokens.column("split"), split),
                                      pc.equal(tokens.column("bucket"), bucket)))
        lists = group.column("tokens").combine_chunks()
        flat, offsets = lists.values.to_numpy(), lists.offsets.to_numpy()
        written += write_shard({"id": group.column("id").to_pylist(), "split": [split], "bucket": [bucket],
                     "tokens": [flat[a:b] for a, b in pairwise(offsets)]},
                    out_dir=join_uri(cfg.storage.root, "one-process"), fs_factory=store.pyarrow_filesystem,
                    seq_len=cfg.seq_len, eos_id=tok.eos_id)["tokens"][0]
    return written


def pipeline_run(args, corpus: Path, store_root: Path) -> tuple[dict, object]:
    """``lm data prepare`` on the corpus in a fresh local Ray instance, sampled (Sampler): seconds, MB/s,
    seconds per stage, peak memory (driver RSS, USS per role, object store in use, spilled)."""
    from lm.cluster import connect

    cfg = load_config(None, [
        "name=bench", f"storage.root={store_root}", f"data.sources=[{{name: bench, uri: '{corpus}'}}]",
        "tokenizer.vocab_size=8192", "tokenizer.max_train_bytes=10000000", "data.seq_len=256",
        "model.max_seq_len=256",
        "data.languages=[]", "data.quality.enabled=false",  # verse, like the Shakespeare presets (docs/data.md)
        *args.overrides,
    ])
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    class Stages(logging.Handler):  # each stage's line (lm.progress.stage logs every one; the terminal shows some)
        def emit(self, record: logging.LogRecord) -> None:
            log(record.getMessage())

    logging.getLogger("lmforge.progress").addHandler(Stages(logging.INFO))
    logging.getLogger("lmforge.progress").setLevel(logging.INFO)

    if args.object_store_mb:  # a small store: the shuffles must spill to disk, not fail
        import ray

        from lm.cluster import worker_env

        ray.init(object_store_memory=int(args.object_store_mb * 2**20), configure_logging=False,
                 runtime_env={"env_vars": worker_env()})
    connect()
    with Sampler(args.interval) as memory:
        start = time.perf_counter()
        manifest = prepare_data(cfg, log=log)
        seconds = time.perf_counter() - start
    stages = {m[1]: float(m[2]) for line in lines
              if (m := re.match(r"data: (.+?)(?: [\d,]+ .*| \(.*|:.*)? \[([\d.]+) s\]$", line))}
    return {"pipeline_seconds": round(seconds, 1), "stage_seconds": stages, "memory": memory.summary(),
            "tokens": sum(s.tokens for s in manifest.splits.values()),
            "shard_tokens": sum(s.tokens for s in manifest.shards), "dedup": manifest.dedup}, cfg


def measure(args) -> dict:
    """One corpus of --mb MB: the pipeline and (unless --pipeline-only) the one-process baselines."""
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        corpus, store_root = Path(tmp) / "corpus", Path(tmp) / "store"
        mb = build_corpus(corpus, args.mb, args.files) / 1e6
        result, cfg = pipeline_run(args, corpus, store_root)
        result = {"machine": machine(), "corpus_mb": round(mb, 1), "files": args.files,
                  "pipeline_mb_s": round(mb / result["pipeline_seconds"], 3), **result, "overrides": args.overrides}
        if args.pipeline_only:
            return result
        import ray

        ray.shutdown()  # the baselines run alone on the machine
        store = ObjectStore(cfg.storage)
        one_s, one_stages, one_tokens = one_process(cfg, store)
        if one_tokens != result["shard_tokens"]:
            raise SystemExit(f"the one-process run wrote {one_tokens} tokens, the pipeline {result['shard_tokens']}: "
                             "not the same work")
        tok = BPETokenizer.from_json((store_root / "runs/bench/data/tokenizer.json").read_text())
        base_mb_s, base_s = baseline_mb_s(corpus, tok, "all")
        thread_mb_s, thread_s = baseline_mb_s(corpus, tok, "one")
    return {**result, "one_process_seconds": round(one_s, 1), "one_process_stage_seconds": one_stages,
            "ratio_vs_one_process": round(one_s / result["pipeline_seconds"], 3),
            "baseline_seconds": round(base_s, 1), "baseline_mb_s": round(base_mb_s, 2),
            "ratio": round(mb / result["pipeline_seconds"] / base_mb_s, 3),
            "baseline_one_thread_seconds": round(thread_s, 1), "baseline_one_thread_mb_s": round(thread_mb_s, 2),
            "ratio_vs_one_thread": round(mb / result["pipeline_seconds"] / thread_mb_s, 3)}


def memory_sizes(args) -> dict:
    """The pipeline alone at each of --sizes MB, each in a fresh process (a fresh Ray: the object store's
    spilled bytes are a running total), in files of --file-mb MB (a corpus grows by files: a task holds one
    file's blocks, bounded by data.block_mb); the goal: at most 1.5x the peak memory for 10x the data. With
    --object-store-mb, one more run at the largest size in an object store that small (the shuffles spill)."""
    runs = [_pipeline_in_subprocess(args, mb, None) for mb in args.sizes]
    peaks = [peak_memory(r) for r in runs]
    result = {"machine": machine(), "sizes_mb": args.sizes, "file_mb": args.file_mb, "runs": runs, "peaks_mib": peaks,
              "growth": {k: round(peaks[-1][k] / peaks[0][k], 2) for k in peaks[0] if peaks[0][k]}}
    if args.object_store_mb:
        small = _pipeline_in_subprocess(args, max(args.sizes), args.object_store_mb)
        result["small_object_store"] = {"object_store_mb": args.object_store_mb, "run": small,
                                        "peaks_mib": peak_memory(small)}
    return result


def _pipeline_in_subprocess(args, mb: float, object_store_mb: float | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--mb", str(mb), "--files", str(max(1, round(mb / args.file_mb))),
                        "--pipeline-only", "--out", out.name, "--interval", str(args.interval),
                        *(["--object-store-mb", str(object_store_mb)] if object_store_mb else []),
                        *args.overrides], check=True)
        return json.loads(Path(out.name).read_text())


def peak_memory(run: dict) -> dict:
    """The numbers the goal compares (MiB): driver RSS, the largest worker's and all workers' (at one instant)
    anonymous memory (a worker's USS also counts object-store blocks it wrote: see jobs/bench/memory.py),
    the object store's peak and the bytes spilled."""
    mem, roles = run["memory"], run["memory"]["roles"].values()
    return {"driver_rss": mem["driver_peak_rss_mib"], "largest_worker_anon": max(r["peak_anon_mib"] for r in roles),
            "workers_anon_sum": sum(r["peak_sum_anon_mib"] for r in roles),
            "largest_worker_uss": max(r["peak_uss_mib"] for r in roles),
            "object_store": mem["object_store_peak_mib"], "spilled": mem["spilled_mib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    parser.add_argument("--sizes", type=lambda v: [float(x) for x in v.split(",")], default=None,
                        help="pipeline memory at these sizes (MB, comma-separated) instead: writes --out")
    parser.add_argument("--files", type=int, default=20, help="files of the corpus (--mb)")
    parser.add_argument("--file-mb", type=float, default=5.0, help="MB a file (--sizes)")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    parser.add_argument("--object-store-mb", type=float, default=None,
                        help="Ray's object store size (default: Ray's, 30%% of RAM; with --sizes: one more run "
                        "at the largest size with it)")
    parser.add_argument("--pipeline-only", action="store_true", help="no one-process baselines")
    parser.add_argument("--out", default=None, help="JSON (default results/data.json, with --sizes "
                        "results/data_memory.json)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.dedup.near=false")
    args = parser.parse_args()
    if args.sizes:
        write_result(args.out or "jobs/bench/results/data_memory.json", memory_sizes(args))
    else:
        write_result(args.out or "jobs/bench/results/data.json", measure(args))


if __name__ == "__main__":
    main()
