"""The model deployment: one model directory on lm.serve.engine, continuously batched.

Each request (a dict from the ingress: prompt text + sampling settings) is tokenized and checked
against the context here, then joins the :class:`BatchScheduler`'s running batch at the next decode
step (up to ``serve.max_batch_size`` rows) and leaves it the step it finishes. The engine's blocking
steps run in a worker thread, so the replica keeps accepting requests while the batch decodes.

Non-streamed requests go through ``complete`` (the whole completion in one reply instead of one
message per token). The stream a request gets from ``generate``: first a head (``prompt_tokens``,
``version``) or an ``error`` (the ingress answers 400), then one chunk per step (``text``,
``token_ids``, ``logprobs``, ``tokens``, ``finish_reason``). A caller that goes away frees its row.
Deterministic requests (temperature 0, or a seed) are answered from a bounded LRU cache when seen
before on the same model version.

Hot reload: ``reconfigure(user_config={"model_uri": …})`` loads the new directory in a thread and
swaps the engine; rows already decoding finish on the engine they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
from typing import Any

from lm.config import Config
from lm.storage import ObjectStore


class BatchScheduler:
    """Continuous batching on one engine: a loop steps one :class:`~lm.serve.engine.DecodeBatch`; a
    request that arrives joins it at the next step (prefilled and merged into the running KV cache, up
    to ``max_batch_size`` rows) and leaves the step it finishes, so nobody waits for a whole batch.

    Serve's ``@serve.batch`` instead forms batches from whatever arrives within its timeout, and runs
    them one after another: under steady load it measured batches of 1-2 here (``jobs/bench/serve.py``).
    Each step's blocking tensor work runs in a worker thread (one hop per step), so the replica keeps
    accepting requests. After a hot reload, requests for the new engine wait until the rows on the old
    one have finished. ``wait_s``: an idle engine waits this long for a burst to arrive together."""

    def __init__(self, max_batch_size: int, observe_batch=lambda n: None, wait_s: float = 0.0):
        self.max_batch_size, self.observe_batch, self.wait_s = max_batch_size, observe_batch, wait_s
        self.pending: list[tuple[int, Any, Any]] = []  # (key, request, engine)
        self.queues: dict[int, asyncio.Queue] = {}  # key -> the request's StepOutputs, then None or an error
        self.cancelled: set[int] = set()
        self._keys = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def outputs(self, request, engine):
        """The request's StepOutputs as they come; closing this early takes the row out of the batch."""
        key = next(self._keys)
        queue = self.queues[key] = asyncio.Queue()
        self.pending.append((key, request, engine))
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        try:
            while (out := await queue.get()) is not None:
                if isinstance(out, Exception):
                    raise out
                yield out
        finally:
            if key in self.queues:  # left early (client gone, call cancelled): free its row
                self.cancelled.add(key)
                self.pending = [p for p in self.pending if p[0] != key]
                self.queues.pop(key, None)

    async def _run(self) -> None:
        batch = None
        while True:
            if not self.pending and not batch:
                await self._wake.wait()
                self._wake.clear()
                continue
            if not batch:
                if self.wait_s and len(self.pending) < self.max_batch_size:
                    await asyncio.sleep(self.wait_s)  # an idle engine: let a burst arrive together
                batch = self.pending[0][2].batch()
            joining = [p for p in self.pending if p[2] is batch.engine][: batch.room()]
            if joining:
                taken = {p[0] for p in joining}
                self.pending = [p for p in self.pending if p[0] not in taken]
                self.observe_batch(len(batch) + len(joining))
            cancelled, self.cancelled = self.cancelled, set()
            try:
                outputs = await asyncio.to_thread(_step, batch, joining, cancelled)
            except Exception as err:  # the engine failed: every request of the batch hears it
                for key in [row.key for row in batch.rows] + [p[0] for p in joining]:
                    if (queue := self.queues.pop(key, None)) is not None:
                        queue.put_nowait(err)
                batch = None
                continue
            for key, out in outputs:
                if (queue := self.queues.get(key)) is None:
                    batch.cancel(key)  # its caller left while the step ran
                    continue
                queue.put_nowait(out)
                if out.finish_reason is not None:
                    queue.put_nowait(None)
                    del self.queues[key]


def _step(batch, joining: list, cancelled: set) -> list:
    """One scheduler step in the worker thread: drop cancelled rows, admit new ones, decode one token."""
    for key in cancelled:
        batch.cancel(key)
    batch.add([request for _, request, _ in joining], [key for key, _, _ in joining])
    return batch.step()


class ModelServer:
    def __init__(self, cfg: Config, store: ObjectStore):
        import torch
        from ray.serve.metrics import Counter, Histogram

        from lm.serve.cache import ResponseCache

        torch.set_num_threads(max(1, round(cfg.serve.replica_cpus)))  # more threads than CPUs thrash
        self.cfg, self.store = cfg, store
        self.engine: Any = None
        self.version: str | None = None
        self.model_uri: str | None = None
        self.cache = ResponseCache(cfg.serve.cache_entries)
        self.m_tokens = Counter("lmforge_generated_tokens", description="Tokens generated.")
        self.m_batch = Histogram("lmforge_batch_size", description="Requests decoded together.",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_cache = Counter("lmforge_cache_lookups", description="Response-cache lookups by result.",
                               tag_keys=("result",))
        self.scheduler = BatchScheduler(cfg.serve.max_batch_size, self.m_batch.observe, cfg.serve.batch_wait_timeout_s)

    # ------------------------------------------------------------------------------------ loading

    def _load(self, uri: str) -> tuple[Any, str]:
        from lm.modeldir import load_model_dir
        from lm.serve.engine import Engine

        loaded = load_model_dir(self.store, uri)
        model = loaded.model.eval()
        if self.cfg.serve.quantize == "int8":
            from lm.serve.quantize import quantize_int8

            model = quantize_int8(model)
        version = hashlib.sha256(f"{uri}\n{json.dumps(loaded.lineage, sort_keys=True)}".encode()).hexdigest()[:12]
        return Engine(model, loaded.tokenizer, max_batch_size=self.cfg.serve.max_batch_size), version

    async def reconfigure(self, user_config: dict) -> None:
        uri = user_config["model_uri"]
        if uri == self.model_uri and self.engine is not None and not user_config.get("force"):
            return
        engine, version = await asyncio.to_thread(self._load, uri)
        self.engine, self.version, self.model_uri = engine, version, uri  # in-flight batches keep the old one

    def info(self) -> dict:
        return {"model_uri": self.model_uri, "version": self.version, "context_length": self.engine.context_length(),
                "cache": {"hits": self.cache.hits, "misses": self.cache.misses, "hit_rate": self.cache.hit_rate}}

    # --------------------------------------------------------------------------------- generation

    def _prepare(self, req: dict):
        """(engine, version, GenRequest, cache key) or an error dict the ingress turns into a 400."""
        from lm.serve.engine import GenRequest

        engine, version = self.engine, self.version
        ids = engine.tokenizer.encode(req["prompt"]) or [engine.tokenizer.eos_id]
        limit = engine.context_length()
        if len(ids) + req["max_tokens"] > limit:
            param = "prompt" if len(ids) >= limit else "max_tokens"
            return {"error": f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} and "
                             f"max_tokens asks for {req['max_tokens']} more.", "param": param}
        request = GenRequest(prompt_ids=ids, max_tokens=req["max_tokens"], temperature=req["temperature"],
                             top_p=req.get("top_p"), top_k=req.get("top_k"), seed=req.get("seed"),
                             stop=list(req.get("stop") or []), logprobs=bool(req.get("logprobs")))
        try:
            engine.check(request)  # one bad request must not fail the batch it would join
        except ValueError as err:
            return {"error": str(err), "param": None}
        return engine, version, request, self.cache.key(version, req)

    def _cached(self, key: str | None) -> dict | None:
        if not key:
            return None
        cached = self.cache.get(key)
        self.m_cache.inc(tags={"result": "hit" if cached else "miss"})
        return cached

    async def complete(self, req: dict) -> dict:
        """One request, answered whole (one batched call, no per-step messages between processes):
        ``prompt_tokens``, ``version``, ``cached`` and the completion (or an ``error``)."""
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            return prepared
        engine, version, request, key = prepared
        head = {"prompt_tokens": len(request.prompt_ids), "version": version}
        if (cached := self._cached(key)) is not None:
            return {**head, **cached, "cached": True}
        whole = {"text": "", "token_ids": [], "logprobs": [] if request.logprobs else None, "finish_reason": None}
        async for out in self.scheduler.outputs(request, engine):
            whole["text"] += out.text
            whole["token_ids"] += out.token_ids
            if request.logprobs:
                whole["logprobs"] += out.logprobs or []
            whole["finish_reason"] = out.finish_reason or whole["finish_reason"]
        whole["tokens"] = [engine.tokenizer.decode([i]) for i in whole["token_ids"]] if request.logprobs else None
        if whole["token_ids"]:
            self.m_tokens.inc(len(whole["token_ids"]))
        if key:
            self.cache.put(key, whole)
        return {**head, **whole, "cached": False}

    async def generate(self, req: dict):
        """Stream one request (see the module docstring)."""
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            yield prepared
            return
        engine, version, request, key = prepared
        tokenizer = engine.tokenizer
        head = {"prompt_tokens": len(request.prompt_ids), "version": version}
        if (cached := self._cached(key)) is not None:
            yield {**head, "cached": True}
            yield cached
            return
        yield head
        whole = {"text": "", "token_ids": [], "logprobs": [] if request.logprobs else None, "tokens": [],
                 "finish_reason": None}
        async with contextlib.aclosing(self.scheduler.outputs(request, engine)) as outputs:  # a client gone: row freed
            async for out in outputs:
                chunk = {"text": out.text, "token_ids": out.token_ids, "logprobs": out.logprobs,
                         "tokens": [tokenizer.decode([i]) for i in out.token_ids] if request.logprobs else None,
                         "finish_reason": out.finish_reason}
                if out.token_ids:
                    self.m_tokens.inc(len(out.token_ids))
                whole["text"] += out.text
                whole["token_ids"] += out.token_ids
                if request.logprobs:
                    whole["logprobs"] += out.logprobs or []
                    whole["tokens"] += chunk["tokens"]
                whole["finish_reason"] = out.finish_reason or whole["finish_reason"]
                yield chunk
        if key and whole["finish_reason"]:
            self.cache.put(key, whole)
