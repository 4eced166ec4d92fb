"""Benchmark serving through Ray Serve: tokens/s and p50 / p99 latency over HTTP, batched against
unbatched, against the naive baseline (Hugging Face ``transformers`` ``generate``, one request at a time).

    ../shared/tools/loopback-only .venv/bin/python jobs/bench/serve.py \\
        --model ./lmforge-store/runs/shakespeare-cpu/model --out jobs/bench/results/serve.json

(``loopback-only`` so Ray and the HTTP proxy bind 127.0.0.1 only; the script starts Ray itself and
shuts down what it started.)

Prompts: a speaker's name and first line from tinyshakespeare (a different one per request, in a fixed
shuffled order). Every request: ``POST /v1/completions``, temperature 0.8, no seed, ``--max-tokens``;
generation may end early at end-of-text, so tokens are counted from ``usage.completion_tokens``
(end-of-text is not counted, on either side). The response cache is off (``serve.cache_entries=0``).

  * naive baseline: the same model directory loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer``,
    ``generate(do_sample=True, temperature=0.8, top_k=0)`` one request at a time in this process, on
    as many torch threads as the model replica gets CPUs; tokens/s = generated tokens / wall seconds.
    Also lm.serve.engine in this process, one request at a time (same prompts, same threads).
  * HTTP: one model replica (autoscaling fixed at 1) with ``serve.replica_cpus`` CPUs (a separate ingress in
    front of it, serve's default; ``--colocate``: the API inside that replica, ``serve.colocate``), deployed with
    ``lm.serve.deploy.start``; closed-loop load at each concurrency (that many requests always in flight,
    ``max(--requests, 8 x concurrency)`` requests): tokens/s = completion tokens / wall seconds from the
    first send to the last answer (the target's number); also steady-state tokens/s (the tokens of the
    requests answered before the last one was sent, over that time: without the drain at the end,
    when fewer than ``concurrency`` requests are in flight); per-request latency p50 / p99. Batched
    (``serve.max_batch_size`` = --max-batch-size), then redeployed unbatched (``serve.max_batch_size=1``);
    ``max_ongoing_requests`` is left at its default, 2 x max_batch_size.
  * HTTP overhead: the same greedy request (temperature 0, so both paths make the same tokens), one at a
    time, alternately in-process (lm.serve.engine on the loaded directory, tokenization included) and
    over HTTP to the batched deployment; overhead = HTTP p50 - in-process p50, at max_tokens 1 (the
    fixed cost of a request: the target) and at --max-tokens (adds the per-token streaming from the
    model replica to the ingress). Also a ``GET /healthz`` round trip.

Targets (issue 6): tokens/s at concurrency 16 >= 5x the naive baseline; HTTP overhead <= 15 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import os
import random
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from results_io import machine, write_result

from lm.config import StorageConfig, load_config
from lm.modeldir import load_model_dir
from lm.serve.engine import Engine, GenRequest
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]
CONCURRENCY = (1, 8, 16, 32)
TEMPERATURE = 0.8
T0 = time.perf_counter()


def log(line: str) -> None:
    print(f"[serve-bench {time.perf_counter() - T0:6.1f}s] {line}", file=sys.stderr, flush=True)


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def latency_stats(latencies: list[float]) -> dict:
    a = np.asarray(latencies)
    return {"p50_ms": ms(float(np.percentile(a, 50))), "p99_ms": ms(float(np.percentile(a, 99))),
            "mean_ms": ms(float(a.mean())), "max_ms": ms(float(a.max()))}


def corpus_prompts(tokenizer, n: int, max_prompt_tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts "NAME:\\nfirst line\\n" from tinyshakespeare's speeches, shuffled."""
    with gzip.open(REPO / "lm/corpora/tinyshakespeare.txt.gz", "rt") as f:
        speeches = f.read().split("\n\n")
    prompts = []
    for speech in speeches:
        lines = speech.strip().splitlines()
        if len(lines) >= 2 and lines[0].endswith(":"):
            prompt = f"{lines[0]}\n{lines[1]}\n"
            if len(tokenizer.encode(prompt)) <= max_prompt_tokens:
                prompts.append(prompt)
    prompts = sorted(set(prompts))
    random.Random(seed).shuffle(prompts)
    if len(prompts) < n:
        raise SystemExit(f"only {len(prompts)} prompts of <= {max_prompt_tokens} tokens; asked for {n}")
    return prompts[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ baselines


def one_at_a_time(one, prompts: list[str]) -> tuple[int, float, list[float]]:
    """Run ``one(prompt) -> tokens`` over the prompts in turn after two warm-ups: (tokens, wall seconds,
    per-request latencies)."""
    for p in prompts[:2]:
        one(p)
    latencies, tokens = [], 0
    start = time.perf_counter()
    for p in prompts:
        t = time.perf_counter()
        tokens += one(p)
        latencies.append(time.perf_counter() - t)
    return tokens, time.perf_counter() - start, latencies


def naive_baseline(model_dir: Path, prompts: list[str], max_tokens: int) -> dict:
    """Hugging Face transformers ``generate``, one request at a time, in this process."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = tok.eos_token_id

    def one(prompt: str) -> int:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                                 max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id)
        new = out[0, ids.input_ids.shape[1]:].tolist()
        tok.decode(new, skip_special_tokens=True)  # the text, as a server would return it
        return new.index(eos) if eos in new else len(new)  # end-of-text is not counted (as the engine)

    tokens, wall, latencies = one_at_a_time(one, prompts)
    return {"what": f"transformers {transformers.__version__} {type(model).__name__}.generate, do_sample, "
                    f"temperature {TEMPERATURE}, top_k 0, one request at a time",
            "requests": len(prompts), "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), **latency_stats(latencies)}


def engine_sequential(engine: Engine, prompts: list[str], max_tokens: int) -> dict:
    """lm.serve.engine in this process, one request at a time (what one replica does without batching,
    without Serve and HTTP)."""
    tok = engine.tokenizer

    def one(prompt: str) -> int:
        c = engine.generate([GenRequest(tok.encode(prompt), max_tokens, temperature=TEMPERATURE)])[0]
        return c.completion_tokens

    tokens, wall, latencies = one_at_a_time(one, prompts)
    return {"requests": len(prompts), "completion_tokens": tokens, "seconds": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), **latency_stats(latencies)}


# ----------------------------------------------------------------------------------------- HTTP


def completion_body(prompt: str, max_tokens: int, temperature: float) -> dict:
    return {"model": "lmforge", "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}


async def _load(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Closed loop: ``concurrency`` workers, each sending its next request as soon as one is answered."""
    queue = list(reversed(prompts))
    latencies: list[float] = []
    tokens = 0
    done: list[tuple[float, float, int]] = []  # (sent, answered, tokens)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=600) as client:
        async def worker() -> None:
            nonlocal tokens
            while queue:
                prompt = queue.pop()
                t = time.perf_counter()
                r = await client.post("/v1/completions", json=completion_body(prompt, max_tokens, TEMPERATURE))
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                n = r.json()["usage"]["completion_tokens"]
                tokens += n
                done.append((t, time.perf_counter(), n))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    # steady state: until the last request is sent (after it, fewer than `concurrency` are in flight)
    last_sent = max(sent for sent, _, _ in done)
    steady = sum(n for _, answered, n in done if answered <= last_sent) / max(last_sent - start, 1e-9)
    return {"concurrency": concurrency, "requests": len(prompts), "completion_tokens": tokens,
            "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "steady_tokens_per_s": round(steady, 1), **latency_stats(latencies)}


def load_levels(base: str, prompts: list[str], levels_of: tuple[int, ...], requests: int, max_tokens: int,
                label: str) -> dict:
    asyncio.run(_load(base, prompts[:16], 8, 8))  # warm-up: the replica's first batches, connections
    levels = {}
    offset = 0
    for c in levels_of:
        n = max(requests, 8 * c)
        chunk = [prompts[(offset + i) % len(prompts)] for i in range(n)]
        offset += n
        levels[str(c)] = row = asyncio.run(_load(base, chunk, c, max_tokens))
        log(f"{label} c={c}: {row['tokens_per_s']} tok/s (steady {row['steady_tokens_per_s']}), "
            f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms ({n} requests, {row['seconds']} s)")
    return levels


def overhead(base: str, engine: Engine, prompts: list[str], max_tokens: int, repeats: int) -> dict:
    """The same greedy request alternately in-process and over HTTP, one at a time."""
    tok = engine.tokenizer
    local, remote, same = [], [], 0
    with httpx.Client(base_url=base, timeout=120) as client:
        for i in range(repeats + 3):
            prompt = prompts[i % len(prompts)]
            t = time.perf_counter()
            c = engine.generate([GenRequest(tok.encode(prompt), max_tokens, temperature=0)])[0]
            tok.decode(c.token_ids)
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            r = client.post("/v1/completions", json=completion_body(prompt, max_tokens, 0))
            t_remote = time.perf_counter() - t
            r.raise_for_status()
            if i < 3:
                continue  # warm-up
            local.append(t_local)
            remote.append(t_remote)
            body = r.json()
            same += body["usage"]["completion_tokens"] == c.completion_tokens and body["choices"][0]["text"] == c.text
            if r.headers.get("x-lmforge-cache") == "hit":
                raise RuntimeError("a cache hit: the benchmark needs serve.cache_entries=0")
    p50_local, p50_remote = np.percentile(local, 50), np.percentile(remote, 50)
    return {"max_tokens": max_tokens, "requests": repeats,
            "in_process_p50_ms": ms(float(p50_local)), "http_p50_ms": ms(float(p50_remote)),
            "http_p99_ms": ms(float(np.percentile(remote, 99))),
            "overhead_p50_ms": ms(float(p50_remote - p50_local)),
            "paired_difference_p50_ms": ms(float(np.percentile(np.subtract(remote, local), 50))),
            "same_output_fraction": round(same / repeats, 3)}


def healthz(base: str, repeats: int) -> dict:
    with httpx.Client(base_url=base, timeout=30) as client:
        times = []
        for i in range(repeats + 3):
            t = time.perf_counter()
            client.get("/healthz").raise_for_status()
            if i >= 3:
                times.append(time.perf_counter() - t)
    return {"requests": repeats, **latency_stats(times)}


def deploy(model: str, port: int, max_batch_size: int, replica_cpus: float, colocate: bool) -> dict:
    from lm.serve.deploy import start

    overrides = [f"serve.model={model}", "serve.require_auth=false", f"serve.port={port}", "serve.cache_entries=0",
                 f"serve.replica_cpus={replica_cpus}", f"serve.max_batch_size={max_batch_size}",
                 "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1", f"serve.colocate={colocate}"]
    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", overrides)
    t = time.perf_counter()
    start(cfg)
    log(f"deployed max_batch_size={max_batch_size} in {time.perf_counter() - t:.1f} s")
    sc = cfg.serve
    return {"max_batch_size": sc.max_batch_size, "max_ongoing_requests": sc.ongoing_requests,
            "batch_wait_timeout_s": sc.batch_wait_timeout_s, "replica_cpus": sc.replica_cpus,
            "replica_torch_threads": max(1, round(sc.replica_cpus)), "ingress_cpus": sc.ingress_cpus,
            "replicas": 1, "cache_entries": sc.cache_entries, "colocate": sc.colocate}


# ----------------------------------------------------------------------------------------- main


def table(result: dict, levels_of: tuple[int, ...]) -> str:
    rows = ["| concurrency | batched tok/s | batched p50 ms | batched p99 ms "
            "| unbatched tok/s | unbatched p50 ms | unbatched p99 ms |", "|---|---|---|---|---|---|---|"]
    for c in levels_of:
        b, u = result["http"]["batched"]["levels"][str(c)], result["http"]["unbatched"]["levels"][str(c)]
        rows.append(f"| {c} | {b['tokens_per_s']} | {b['p50_ms']} | {b['p99_ms']} "
                    f"| {u['tokens_per_s']} | {u['p50_ms']} | {u['p99_ms']} |")
    n, e = result["naive_baseline"], result["engine_in_process_sequential"]
    rows.append(f"| naive (transformers, 1 at a time) | {n['tokens_per_s']} | {n['p50_ms']} | {n['p99_ms']} | | | |")
    rows.append(f"| lm.serve.engine in-process, 1 at a time | {e['tokens_per_s']} | {e['p50_ms']} | {e['p99_ms']} "
                "| | | |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="./lmforge-store/runs/shakespeare-cpu/model")
    parser.add_argument("--requests", type=int, default=64,
                        help="requests per concurrency level (at least 8 x the concurrency) and for the baselines")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="serve.max_batch_size of the batched run")
    parser.add_argument("--replica-cpus", type=float, default=1.0,
                        help="serve.replica_cpus; the baselines use as many torch threads (rounded)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="levels, comma-separated")
    parser.add_argument("--overhead-requests", type=int, default=30)
    parser.add_argument("--colocate", action=argparse.BooleanOptionalAction, default=False,
                        help="serve.colocate: the API inside the model replica (default: a separate ingress)")
    parser.add_argument("--out", default="jobs/bench/results/serve.json")
    args = parser.parse_args()
    levels_of = tuple(int(c) for c in args.concurrency.split(","))

    threads = max(1, round(args.replica_cpus))
    torch.set_num_threads(threads)
    model_dir = Path(args.model).resolve()
    load_start = os.getloadavg()[0]
    loaded = load_model_dir(ObjectStore(StorageConfig()), str(model_dir))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=1)
    context = engine.context_length()
    total = sum(max(args.requests, 8 * c) for c in levels_of) + 16
    prompts = corpus_prompts(loaded.tokenizer, total, min(48, context - args.max_tokens))
    prompt_tokens = [len(loaded.tokenizer.encode(p)) for p in prompts]

    log(f"naive baseline: {args.requests} requests, transformers generate, {threads} torch thread(s)")
    naive = naive_baseline(model_dir, prompts[: args.requests], args.max_tokens)
    log(f"naive baseline: {naive['tokens_per_s']} tok/s, p50 {naive['p50_ms']} ms")
    inproc = engine_sequential(engine, prompts[: args.requests], args.max_tokens)
    log(f"engine in-process, sequential: {inproc['tokens_per_s']} tok/s, p50 {inproc['p50_ms']} ms")

    import ray

    from lm.cluster import connect, worker_env

    # connect()'s ray.init, minus the replicas' per-request access logs echoed into this process
    ray.init(configure_logging=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
    connect()
    from ray import serve

    result: dict = {}
    try:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        http: dict = {}
        settings = deploy(str(model_dir), port, args.max_batch_size, args.replica_cpus, args.colocate)
        over = {"healthz": healthz(base, args.overhead_requests),
                "max_tokens_1": overhead(base, engine, prompts, 1, args.overhead_requests),
                f"max_tokens_{args.max_tokens}": overhead(base, engine, prompts, args.max_tokens,
                                                          args.overhead_requests)}
        log(f"overhead: healthz p50 {over['healthz']['p50_ms']} ms; max_tokens=1 http p50 "
            f"{over['max_tokens_1']['http_p50_ms']} ms vs in-process {over['max_tokens_1']['in_process_p50_ms']} ms")
        http["batched"] = {"settings": settings, "levels": load_levels(base, prompts, levels_of, args.requests,
                                                                       args.max_tokens, "batched")}
        settings = deploy(str(model_dir), port, 1, args.replica_cpus, args.colocate)
        http["unbatched"] = {"settings": settings, "levels": load_levels(base, prompts, levels_of, args.requests,
                                                                         args.max_tokens, "unbatched")}
    finally:
        serve.shutdown()
        ray.shutdown()

    c16 = http["batched"]["levels"].get("16", {}).get("tokens_per_s", float("nan"))
    speedup = round(c16 / naive["tokens_per_s"], 2)
    http_overhead = over["max_tokens_1"]["overhead_p50_ms"]
    result = {
        "benchmark": "serve",
        "machine": machine(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "threads": threads,
        "threads_note": f"the model replica gets serve.replica_cpus={args.replica_cpus} CPU(s) and "
                        f"{threads} torch thread(s); the in-process baselines use {threads} torch thread(s)",
        "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
        "model": str(model_dir),
        "model_parameters": sum(p.numel() for p in loaded.model.parameters()),
        "max_tokens": args.max_tokens,
        "temperature": TEMPERATURE,
        "prompt_tokens": {"min": min(prompt_tokens), "median": int(np.median(prompt_tokens)),
                          "max": max(prompt_tokens)},
        "naive_baseline": naive,
        "engine_in_process_sequential": inproc,
        "http": http,
        "http_overhead": over,
        "summary": {
            "batched_tokens_per_s_at_16": c16,
            "naive_tokens_per_s": naive["tokens_per_s"],
            "speedup_at_16_vs_naive": speedup,
            "steady_speedup_at_16_vs_naive": round(http["batched"]["levels"].get("16", {}).get(
                "steady_tokens_per_s", float("nan")) / naive["tokens_per_s"], 2),
            "speedup_target": 5.0,
            "speedup_target_met": speedup >= 5.0,
            "http_overhead_p50_ms": http_overhead,
            "http_overhead_target_ms": 15.0,
            "http_overhead_target_met": http_overhead <= 15.0,
            "batched_over_unbatched": {c: round(http["batched"]["levels"][str(c)]["tokens_per_s"]
                                                / http["unbatched"]["levels"][str(c)]["tokens_per_s"], 2)
                                       for c in levels_of},
        },
        "seconds_total": round(time.perf_counter() - T0, 1),
    }
    write_result(args.out, result)
    print(table(result, levels_of))
    print(f"speed-up at concurrency 16 vs naive: {speedup}x (target >= 5x); "
          f"HTTP overhead p50: {http_overhead} ms (target <= 15 ms)")


if __name__ == "__main__":
    main()
