"""The model deployment: one model directory on lm.serve.engine, dynamically batched with ``@serve.batch``.

Each request (a dict from the ingress: prompt text + sampling settings) is tokenized and checked
against the context here, then joins a batch: the batch handler is an async generator that prefills
the batch's prompts together and yields one list per decode step (Serve routes each entry to its
request's stream; a finished request gets ``StopIteration``). The engine's blocking steps run in a
worker thread, so the replica keeps accepting requests while a batch decodes.

The stream a request gets: first a head (``prompt_tokens``, ``version``) or an ``error`` (the
ingress answers 400), then one chunk per step (``text``, ``token_ids``, ``logprobs``, ``tokens``,
``finish_reason``). Deterministic requests (temperature 0, or a seed) are answered from a bounded
LRU cache when seen before on the same model version.

Hot reload: ``reconfigure(user_config={"model_uri": …})`` loads the new directory in a thread and
swaps the engine; batches already decoding finish on the engine they started with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from ray import serve

from lm.config import Config
from lm.storage import ObjectStore


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
        self._batch.set_max_batch_size(cfg.serve.max_batch_size)
        self._batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.m_tokens = Counter("lmforge_generated_tokens", description="Tokens generated.")
        self.m_batch = Histogram("lmforge_batch_size", description="Requests decoded together.",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_cache = Counter("lmforge_cache_lookups", description="Response-cache lookups by result.",
                               tag_keys=("result",))

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

    async def generate(self, req: dict):
        """Stream one request (see the module docstring)."""
        from lm.serve.engine import GenRequest

        engine, version = self.engine, self.version
        tokenizer = engine.tokenizer
        ids = tokenizer.encode(req["prompt"]) or [tokenizer.eos_id]
        limit = engine.context_length()
        if len(ids) + req["max_tokens"] > limit:
            param = "prompt" if len(ids) >= limit else "max_tokens"
            yield {"error": f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} and "
                            f"max_tokens asks for {req['max_tokens']} more.", "param": param}
            return
        key = self.cache.key(version, req)
        cached = self.cache.get(key) if key else None
        if key:
            self.m_cache.inc(tags={"result": "hit" if cached else "miss"})
        if cached:
            yield {"prompt_tokens": len(ids), "version": version, "cached": True}
            yield cached
            return
        request = GenRequest(prompt_ids=ids, max_tokens=req["max_tokens"], temperature=req["temperature"],
                             top_p=req.get("top_p"), top_k=req.get("top_k"), seed=req.get("seed"),
                             stop=list(req.get("stop") or []), logprobs=bool(req.get("logprobs")))
        try:
            engine.check(request)  # one bad request must not fail the batch it would join
        except ValueError as err:
            yield {"error": str(err), "param": None}
            return
        yield {"prompt_tokens": len(ids), "version": version}
        whole = {"text": "", "token_ids": [], "logprobs": [] if request.logprobs else None, "tokens": [],
                 "finish_reason": None}
        async for out in self._batch(request, engine):
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

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batch(self, requests: list, engines: list):
        """The batch handler: all requests decode together on the engine of the first (a reload between
        submission and batching is harmless: versions share the tokenizer)."""
        self.m_batch.observe(len(requests))
        steps = engines[0].stream(requests)
        started = time.perf_counter()
        while True:
            step = await asyncio.to_thread(next, steps, None)
            if step is None:
                break
            yield [StopIteration if out is None else out for out in step]
        self.last_batch_seconds = time.perf_counter() - started
