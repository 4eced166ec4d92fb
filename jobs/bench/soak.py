"""Soak the Serve application: minutes of mixed load, then replica memory growth, unexpected errors and
latency per minute.

    tests/isolated .venv/bin/python jobs/bench/soak.py --minutes 10 --out jobs/bench/results/soak.json

(``tests/isolated`` or ``../shared/tools/loopback-only``: Ray and the HTTP proxy bind 127.0.0.1 only; the
script starts its own Ray instance and shuts down only that.)

Model: ``--model``, by default the demo model (``./lmforge-store/runs/shakespeare-cpu/model``); where that
is missing, a model of the demo's shape (configs/shakespeare-cpu.yaml) with random weights and a tokenizer
trained on 400 tinyshakespeare documents, built in a temporary folder (as the serving tests build theirs).
Served as ``lm serve`` would: configs/shakespeare-cpu.yaml's serve section (a separate ingress in front of
one model replica of 1 CPU, continuous batching, the response cache on), behind a random 43-character API
key (``LMFORGE_API_KEYS``).

Load: ``--threads`` client threads in a closed loop, each picking the next request from a fixed weighted
mix (``MIX``, seeded): completions whole and streamed (temperature 0.8), completions with n=2, chat whole
(greedy: the response cache answers repeats) and streamed, embeddings of 3 inputs, all through the official
``openai`` client; and bad requests through httpx (``BAD``: no key, a wrong key, a body that is not JSON,
max_tokens or n over the limits, an unknown model, a body over serve.max_body_bytes), each expected to get
its own 4xx in OpenAI's error shape. A bad request answered otherwise, and any exception or unexpected
status of a good one, is an unexpected error.

Measured: memory of the Serve processes by role (jobs/bench/memory.Sampler every ``--interval`` s: model
replica, ingress, proxy, controller); RSS (and USS) at the end of the warm-up (the first ``--warmup-minutes``
of the load) and at the end, growth in %; latency of each good request (sent → last byte, a stream read to
its end) as p50 / p99 per minute of the load (by when it was answered), over all good requests and per kind.
Goals (issue 17): model replica + ingress RSS growth under 5%; 0 unexpected errors.
JSON at ``--out`` and a PNG beside it (latency per minute, RSS over time).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import openai
from memory import MIB, Sampler
from results_io import machine, write_result
from serve import corpus_prompts, free_port

REPO = Path(__file__).parents[2]
DEMO = REPO / "lmforge-store/runs/shakespeare-cpu/model"
ROLES = {"ServeReplica:lmforge:model": "model replica", "ServeReplica:lmforge:api": "ingress",
         "ProxyActor": "proxy", "ServeController": "controller"}
WATCHED = ("model replica", "ingress")  # the growth goal
MIX = {"completion": 4, "completion_stream": 3, "completion_n2": 2, "chat": 2, "chat_stream": 2, "embeddings": 2,
       "bad": 2}  # relative weights
BAD = {"no_key": 401, "wrong_key": 401, "not_json": 400, "max_tokens": 400, "n": 400, "unknown_model": 404,
       "too_large": 413}
ENDS = ("stop", "length")  # a random model may stop at once (end-of-text first): no tokens, still an answer
T0 = time.perf_counter()


def log(line: str) -> None:
    print(f"[soak {time.perf_counter() - T0:6.1f}s] {line}", file=sys.stderr, flush=True)


def demo_shaped_model(folder: str) -> str:
    """A model of the demo's shape with random weights (tests/integration/serving.py's way), in ``folder``."""
    from lm.config import load_config
    from lm.data.documents import iter_documents
    from lm.modeldir import save_model_dir
    from lm.storage import ObjectStore
    from lm.tokenizer import train_tokenizer
    from lm.train.weights import build_model

    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", [f"storage.root={folder}"])
    store = ObjectStore(cfg.storage)
    docs = (d.text for d, _ in zip(iter_documents(store, cfg.data, "train"), range(400), strict=False))
    tok = train_tokenizer(docs, cfg.tokenizer)
    uri = f"{folder}/model"
    save_model_dir(store, uri, build_model(cfg, tok.vocab_size), tok, cfg.generate, {"run": "soak-random"})
    return uri


class Unexpected(Exception):
    """A response the soak did not expect (a good request's status or content, a bad request's status)."""


class Load:
    """The mixed load: ``threads`` closed-loop clients until ``stop`` is set; every request's record."""

    def __init__(self, base: str, key: str, prompts: list[str], max_tokens: int, body_limit: int, seed: int):
        self.base, self.key, self.prompts, self.max_tokens = base, key, prompts, max_tokens
        self.body_limit, self.seed = body_limit, seed
        self.records: list[tuple[str, float, float, str]] = []  # (kind, sent, answered, outcome)
        self.errors: Counter[str] = Counter()
        self.stop = threading.Event()

    def run(self, threads: int) -> list[threading.Thread]:
        workers = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(threads)]
        for t in workers:
            t.start()
        return workers

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, timeout=120)
        kinds, weights = list(MIX), list(MIX.values())
        with httpx.Client(base_url=self.base, timeout=120) as http:
            while not self.stop.is_set():
                kind = rng.choices(kinds, weights)[0]
                sent = time.perf_counter()
                try:
                    outcome = self._bad(http, rng) if kind == "bad" else self._good(client, kind, rng)
                except Exception as err:  # every failure is counted, none stops the soak
                    outcome = "error"
                    self.errors[f"{kind}: {type(err).__name__}: {str(err)[:160]}"] += 1
                self.records.append((kind, sent, time.perf_counter(), outcome))

    def _good(self, client: openai.OpenAI, kind: str, rng: random.Random) -> str:
        prompt, m = rng.choice(self.prompts), self.max_tokens
        if kind in ("completion", "completion_n2"):
            n = 2 if kind == "completion_n2" else 1
            r = client.completions.create(model="lmforge", prompt=prompt, max_tokens=m, temperature=0.8, n=n)
            ok = len(r.choices) == n and all(c.finish_reason in ENDS for c in r.choices)
        elif kind == "completion_stream":
            chunks = list(client.completions.create(model="lmforge", prompt=prompt, max_tokens=m, temperature=0.8,
                                                    stream=True))
            ok = bool(chunks) and chunks[-1].choices[0].finish_reason is not None
        elif kind == "chat":
            r = client.chat.completions.create(model="lmforge", messages=[{"role": "user", "content": prompt}],
                                               max_tokens=m, temperature=0)
            ok = r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ENDS
        elif kind == "chat_stream":
            chunks = list(client.chat.completions.create(
                model="lmforge", messages=[{"role": "user", "content": prompt}], max_tokens=m, temperature=0.8,
                stream=True, stream_options={"include_usage": True}))
            ok = bool(chunks) and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0
        else:
            r = client.embeddings.create(model="lmforge", input=rng.sample(self.prompts, 3))
            ok = len(r.data) == 3 and len(r.data[0].embedding) > 0
        if not ok:
            raise Unexpected(f"{kind}: an answer without its parts")
        return "ok"

    def _bad(self, http: httpx.Client, rng: random.Random) -> str:
        what = rng.choice(list(BAD))
        auth = {"Authorization": f"Bearer {self.key}"}
        body: dict = {"model": "lmforge", "prompt": rng.choice(self.prompts), "max_tokens": self.max_tokens}
        if what in ("no_key", "wrong_key"):
            auth = {} if what == "no_key" else {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}
        elif what in ("max_tokens", "n"):
            body[what] = 10**6
        elif what == "unknown_model":
            body["model"] = "gpt-nothing"
        if what in ("not_json", "too_large"):
            content = b'{"model": "lmforge", "prompt": ' if what == "not_json" else b" " * (self.body_limit + 1)
            r = http.post("/v1/completions", content=content, headers={**auth, "Content-Type": "application/json"})
        else:
            r = http.post("/v1/completions", json=body, headers=auth)
        if r.status_code != BAD[what] or "message" not in r.json().get("error", {}):
            raise Unexpected(f"{what}: HTTP {r.status_code} (expected {BAD[what]}): {r.text[:160]}")
        return f"{r.status_code}"


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"requests": 0}
    ms = np.asarray(seconds) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}


def per_minute(records: list[tuple[str, float, float, str]], start: float, minutes: int, warmup: float) -> list[dict]:
    """p50 / p99 of the good requests answered in each minute of the load, over all kinds and per kind; and
    the minute's expected 4xx and unexpected errors."""
    rows = []
    for m in range(minutes):
        mine = [r for r in records if m * 60 <= r[2] - start < (m + 1) * 60]
        good = [r for r in mine if r[3] == "ok"]
        rows.append({"minute": m + 1, "warmup": m < warmup, **percentiles([r[2] - r[1] for r in good]),
                     "by_kind": {k: percentiles([r[2] - r[1] for r in good if r[0] == k]) for k in MIX if k != "bad"},
                     "expected_4xx": sum(r[3] not in ("ok", "error") for r in mine),
                     "unexpected_errors": sum(r[3] == "error" for r in mine)})
    return rows


def memory_growth(timeline: list, warm_end: float, end: float) -> dict:
    """RSS and USS per role (MiB) at the first sample after the warm-up and at the last one before the end,
    and the RSS trend between them (least squares, MiB per minute)."""
    warm = next((s for t, s in timeline if t >= warm_end), timeline[-1][1])
    last = [s for t, s in timeline if t <= end][-1]
    out = {}
    for role in [*WATCHED, "proxy", "controller", *sorted(set(last) - set(ROLES.values()))]:
        if role in warm and role in last:
            (r0, u0, n0), (r1, u1, n1) = warm[role], last[role]
            after = [(t / 60, s[role][0] / MIB) for t, s in timeline if warm_end <= t <= end and role in s]
            slope = float(np.polyfit(*zip(*after, strict=True), 1)[0]) if len(after) > 2 else None
            out[role] = {"processes": [n0, n1], "rss_mib": [round(r0 / MIB, 1), round(r1 / MIB, 1)],
                         "rss_growth_pct": round(100 * (r1 - r0) / r0, 2),
                         "uss_mib": [round(u0 / MIB, 1), round(u1 / MIB, 1)],
                         "uss_growth_pct": round(100 * (u1 - u0) / u0, 2),
                         "rss_trend_mib_per_min": None if slope is None else round(slope, 2)}
    r0 = sum(warm[r][0] for r in WATCHED if r in warm)
    r1 = sum(last[r][0] for r in WATCHED if r in last)
    out["watched"] = {"roles": list(WATCHED), "rss_mib": [round(r0 / MIB, 1), round(r1 / MIB, 1)],
                      "rss_growth_pct": round(100 * (r1 - r0) / max(r0, 1), 2)}
    return out


def plot(result: dict, timeline: list, start: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, mem) = plt.subplots(2, 1, figsize=(9, 7), dpi=100)
    rows = [r for r in result["per_minute"] if r["requests"]]
    minutes = [r["minute"] for r in rows]
    lat.plot(minutes, [r["p50_ms"] for r in rows], "o-", label="p50, all good requests")
    lat.plot(minutes, [r["p99_ms"] for r in rows], "s-", label="p99, all good requests")
    for kind in ("completion", "completion_stream", "embeddings"):
        kept = [(r["minute"], r["by_kind"][kind]["p50_ms"]) for r in rows if r["by_kind"][kind]["requests"]]
        if kept:
            lat.plot(*zip(*kept, strict=True), ":", alpha=0.7, label=f"p50, {kind}")
    lat.set(xlabel="minute of the load", ylabel="latency, ms", yscale="log", title="latency per minute",
            xticks=minutes)
    lat.legend(fontsize=7)
    lat.grid(alpha=0.3)
    for role in (*WATCHED, "proxy", "controller"):
        points = [((t - start) / 60, s[role][0] / MIB) for t, s in timeline if role in s]
        if points:
            mem.plot(*zip(*points, strict=True), label=role)
    mem.axvline(result["warmup_minutes"], color="grey", linestyle="--", label="end of warm-up")
    mem.set(xlabel="minutes since the load began", ylabel="RSS, MiB", title="RSS of the Serve processes")
    mem.legend(fontsize=7)
    mem.grid(alpha=0.3)
    fig.suptitle(f"soak: {result['minutes']} min of mixed load, {result['threads']} client threads "
                 f"({result['machine']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def deploy(model: str, port: int):
    """``lm.serve.deploy.start`` with configs/shakespeare-cpu.yaml's serve section, one model replica."""
    from lm.config import load_config
    from lm.serve.deploy import start

    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", [
        f"serve.model={model}", f"serve.port={port}", "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=1"])
    start(cfg)
    return cfg.serve


def soak(args, model: str, key: str) -> tuple[dict, list, float]:
    """Deploy, warm up, load for ``args.minutes``, sample memory throughout: (result, timeline, load start)."""
    from lm.config import StorageConfig
    from lm.modeldir import load_model_dir
    from lm.storage import ObjectStore

    loaded = load_model_dir(ObjectStore(StorageConfig()), model)
    context = loaded.model.cfg.max_seq_len
    prompts = corpus_prompts(loaded.tokenizer, 300, min(32, context - args.max_tokens - 16), seed=args.seed)
    port = free_port()
    sc = deploy(model, port)
    log(f"deployed {model} on 127.0.0.1:{port}")
    load = Load(f"http://127.0.0.1:{port}", key, prompts, args.max_tokens, sc.max_body_bytes, args.seed)
    load_start = os.getloadavg()[0]
    with Sampler(args.interval, ROLES) as sampler:
        start, mono_start = time.perf_counter(), time.monotonic()
        threads = load.run(args.threads)
        for m in range(args.minutes):
            time.sleep(max(0.0, start + 60 * (m + 1) - time.perf_counter()))
            row = per_minute(load.records, start, m + 1, args.warmup_minutes)[-1]
            log(f"minute {m + 1}: {row['requests']} good, p50 {row.get('p50_ms')} ms, p99 {row.get('p99_ms')} ms, "
                f"{row['expected_4xx']} expected 4xx, {row['unexpected_errors']} unexpected errors")
        load.stop.set()
        for t in threads:
            t.join(timeout=180)
        mono_end = time.monotonic()
    kinds = Counter((r[0], r[3]) for r in load.records)
    result = {"context_length": context, "max_tokens": args.max_tokens,
              "prompt_tokens_max": max(len(loaded.tokenizer.encode(p)) for p in prompts),
              "serve": {"replicas": 1, "replica_cpus": sc.replica_cpus, "ingress_cpus": sc.ingress_cpus,
                        "max_batch_size": sc.max_batch_size, "cache_entries": sc.cache_entries,
                        "colocate": sc.colocate},
              "load_average_1m": {"start": round(load_start, 2), "end": round(os.getloadavg()[0], 2)},
              "requests_total": len(load.records),
              "requests": {f"{k}: {o}": n for (k, o), n in sorted(kinds.items())},
              "expected_4xx_by_status": dict(Counter(r[3] for r in load.records if r[3] not in ("ok", "error"))),
              "unexpected_errors": sum(load.errors.values()),
              "unexpected_error_kinds": dict(load.errors.most_common(20)),
              "memory": memory_growth(sampler.timeline, mono_start + 60 * args.warmup_minutes, mono_end),
              "memory_peaks": sampler.summary()["roles"],
              "rss_timeline_mib": {"minute": [round((t - mono_start) / 60, 2) for t, _ in sampler.timeline],
                                   **{role: [round(s[role][0] / MIB, 1) if role in s else None
                                             for _, s in sampler.timeline]
                                      for role in ROLES.values()}},
              "per_minute": per_minute(load.records, start, args.minutes, args.warmup_minutes)}
    return result, sampler.timeline, mono_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the demo model, else a random one)")
    parser.add_argument("--minutes", type=int, default=10, help="minutes of load, the warm-up included")
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=4, help="client threads (closed loop)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="jobs/bench/results/soak.json")
    args = parser.parse_args()
    if args.warmup_minutes >= args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")
    key = secrets.token_urlsafe(32)  # 43 characters; the server refuses keys under 16
    os.environ["LMFORGE_API_KEYS"] = key

    import ray

    from lm.cluster import worker_env

    with tempfile.TemporaryDirectory(prefix="lm-soak-") as folder:
        model = args.model or (str(DEMO) if (DEMO / "config.json").exists() else demo_shaped_model(folder))
        ray.init(configure_logging=False, log_to_driver=False, runtime_env={"env_vars": worker_env()})
        from ray import serve

        try:
            measured, timeline, start = soak(args, str(Path(model).resolve()), key)
        finally:
            serve.shutdown()
            ray.shutdown()
    watched = measured["memory"]["watched"]
    result = {"benchmark": "soak", "machine": machine(), "ray": ray.__version__, "model": model,
              "model_kind": ("demo" if model == str(DEMO)
                             else ("given" if args.model else "demo-shaped, random weights")),
              "minutes": args.minutes, "warmup_minutes": args.warmup_minutes, "threads": args.threads,
              "seed": args.seed, "mix": MIX, "bad_requests": BAD,
              "latency": "sent → last byte (streams read to the end), good requests only; a request counts in the "
                         "minute it was answered",
              **measured,
              "goals": {"rss_growth_pct_below": 5.0, "rss_growth_met": watched["rss_growth_pct"] < 5.0,
                        "unexpected_errors": 0, "errors_met": measured["unexpected_errors"] == 0},
              "seconds_total": round(time.perf_counter() - T0, 1)}
    write_result(args.out, result)
    plot(result, timeline, start, Path(args.out).with_suffix(".png"))
    print(f"RSS model replica + ingress: {watched['rss_mib'][0]} → {watched['rss_mib'][1]} MiB "
          f"({watched['rss_growth_pct']:+.2f}%, goal < 5%); "
          f"unexpected errors: {measured['unexpected_errors']} (goal 0)")


if __name__ == "__main__":
    main()
