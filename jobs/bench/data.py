"""Benchmark the data pipeline: MB/s of `lm data prepare` against single-process `tokenizers`.

    python jobs/bench/data.py --mb 100 --out jobs/bench/results/data.json

Builds a corpus of at least --mb MB from the bundled tinyshakespeare (each document is 4-15 lines
drawn at random, so documents are not near-duplicates of each other), then measures
  * baseline: one process reading the same files and tokenizing them with ``encode_batch``, once with
    every core (the `tokenizers` default) and once on one thread;
  * pipeline: the whole Ray Data pipeline (read, clean, dedup, split, tokenizer, tokenize, pack, write);
and the peak resident memory of the driver and of the Ray worker processes. Writes JSON.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from results_io import machine, write_result

from lm.config import load_config
from lm.data.pipeline import prepare_data
from lm.tokenizer import BPETokenizer


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


class PeakMemory:
    """Polls the RSS of this process and the summed USS (memory unique to each process, so the shared
    object store is not counted once per worker) of every Ray worker process (MiB)."""

    def __init__(self) -> None:
        self.driver = self.workers = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.5):
            self.driver = max(self.driver, me.memory_info().rss / 2**20)
            rss = 0
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    if p.info["name"].startswith("ray::") or "default_worker.py" in " ".join(p.info["cmdline"] or []):
                        rss += p.memory_full_info().uss
                except (psutil.Error, TypeError):
                    continue
            self.workers = max(self.workers, rss / 2**20)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--out", default="jobs/bench/results/data.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.dedup.near=false")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        corpus, store_root = Path(tmp) / "corpus", Path(tmp) / "store"
        corpus_bytes = build_corpus(corpus, args.mb, args.files)
        cfg = load_config(None, [
            "name=bench", f"storage.root={store_root}", f"data.sources=[{{name: bench, uri: '{corpus}'}}]",
            "tokenizer.vocab_size=8192", "tokenizer.max_train_bytes=10000000", "data.seq_len=256",
            "model.max_seq_len=256", *args.overrides,
        ])
        lines: list[str] = []

        def log(line: str) -> None:
            lines.append(line)
            print(line, flush=True)

        with PeakMemory() as memory:
            start = time.perf_counter()
            manifest = prepare_data(cfg, log=log)
            pipeline_s = time.perf_counter() - start
        tok = BPETokenizer.from_json((store_root / "runs/bench/data/tokenizer.json").read_text())
        base_mb_s, base_s = baseline_mb_s(corpus, tok, "all")
        one_mb_s, one_s = baseline_mb_s(corpus, tok, "one")
    stages = {m[1]: float(m[2]) for line in lines if (m := re.match(r"data: (.+?)(?: [\d,]+ .*| \(.*|:.*)? \[([\d.]+) s\]$", line))}
    result = {
        "machine": machine(),
        "corpus_mb": round(corpus_bytes / 1e6, 1),
        "files": args.files,
        "pipeline_seconds": round(pipeline_s, 1),
        "pipeline_mb_s": round(corpus_bytes / 1e6 / pipeline_s, 2),
        "baseline_seconds": round(base_s, 1),
        "baseline_mb_s": round(base_mb_s, 2),
        "ratio": round(corpus_bytes / 1e6 / pipeline_s / base_mb_s, 3),
        "baseline_one_thread_seconds": round(one_s, 1),
        "baseline_one_thread_mb_s": round(one_mb_s, 2),
        "ratio_vs_one_thread": round(corpus_bytes / 1e6 / pipeline_s / one_mb_s, 3),
        "stage_seconds": stages,
        "peak_driver_rss_mib": round(memory.driver),
        "peak_workers_uss_mib": round(memory.workers),
        "peak_self_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "tokens": sum(s.tokens for s in manifest.splits.values()),
        "dedup": manifest.dedup,
        "overrides": args.overrides,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
