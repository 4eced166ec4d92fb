"""The model deployment: one model directory on lm.serve.engine (loaded by lm.serve.loading), continuously
batched.

Each request (a dict from the ingress: prompt text + sampling settings; chat's ``response_format``
becomes the row's grammar, lm.serve.grammar) is tokenized and checked against the context here, then
joins the :class:`BatchScheduler`'s running batch at the next decode step (up to ``serve.max_batch_size``
rows) and leaves it the step it finishes. The engine's blocking steps run in a worker thread, so the
replica keeps accepting requests while the batch decodes.

Non-streamed requests go through ``complete`` (the whole completion in one reply instead of one
message per token). The stream a request gets from ``generate``: first a head (``prompt_tokens``,
``version``, ``model_uri``, ``prompt_text`` for a token-id prompt) or an ``error`` (the ingress answers 400), then one
chunk per step (``text``, ``token_ids``, ``logprobs``, ``tokens``, ``top_logprobs`` as [token, logprob]
pairs, ``finish_reason``). A prompt is text or token ids. A caller that goes away frees its row.
Deterministic requests (temperature 0, or a seed) are answered from a bounded LRU cache when seen
before on the same model version.

Hot reload: ``reconfigure(user_config={"model_uri": …})`` loads the new directory in a thread and
swaps the engine; rows already decoding finish on the engine they started with. With
``registry:production`` (``serve.model``) each replica loads the registry's production version and
re-reads the alias every ``serve.registry_poll_s``, swapping the same way when it moves (promotion,
rollback); responses then carry the registry's version id as ``system_fingerprint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any

from lm.config import Config
from lm.serve.scheduler import BatchScheduler
from lm.storage import ObjectStore

REGISTRY = "registry:"  # serve.model = registry:production follows the registry's production version


class ModelServer:
    def __init__(self, cfg: Config, store: ObjectStore):
        import torch
        from ray.serve.metrics import Counter, Histogram

        from lm.serve.cache import ResponseCache

        torch.set_num_threads(max(1, round(cfg.serve.replica_cpus)))  # more threads than CPUs thrash
        self.cfg, self.store = cfg, store
        self.engine: Any = None
        self.version: str | None = None  # the registry's version id, or a digest of the directory
        self.model_uri: str | None = None
        self.source = ""  # what reconfigure was given: a directory or registry:<ref>
        self._follower: asyncio.Task | None = None
        self.cache = ResponseCache(cfg.serve.cache_entries)
        self.rag = None
        if cfg.serve.rag:  # the retrieval index (lm.rag), loaded once per replica
            from lm.rag import RagIndex

            self.rag = RagIndex.load(store, cfg.rag_uri)
        self.m_tokens = Counter("lmforge_generated_tokens", description="Tokens generated.")
        self.m_batch = Histogram("lmforge_batch_size", description="Requests decoded together.",
                                 boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.m_cache = Counter("lmforge_cache_lookups", description="Response-cache lookups by result.",
                               tag_keys=("result",))
        sc = cfg.serve
        batching = (sc.max_batch_size, self.m_batch.observe, sc.batch_wait_timeout_s, sc.join_ratio,
                    sc.join_max_wait_steps)
        if sc.engine_process:
            from lm.serve.engine_process import ProcessScheduler

            self.scheduler = ProcessScheduler(cfg.storage, sc.quantize, max(1, round(sc.replica_cpus)), *batching)
        else:
            self.scheduler = BatchScheduler(*batching)

    # ------------------------------------------------------------------------------------ loading

    def _load(self, uri: str) -> tuple[Any, str]:
        """The engine of the model directory at ``uri`` (in the engine process with ``serve.engine_process``;
        both load with lm.serve.loading.load_engine) and a version digest of the directory."""
        from lm.config import join_uri
        from lm.serve.loading import load_engine
        from lm.storage import StorageNotFound

        try:
            lineage = json.loads(self.store.read_text(join_uri(uri, "lineage.json")))
        except StorageNotFound:
            lineage = {}
        version = hashlib.sha256(f"{uri}\n{json.dumps(lineage, sort_keys=True)}".encode()).hexdigest()[:12]
        if hasattr(self.scheduler, "load"):  # the engine process loads the weights
            return self.scheduler.load(uri), version
        sc = self.cfg.serve
        return load_engine(self.store, uri, sc.quantize, sc.max_batch_size), version

    async def reconfigure(self, user_config: dict) -> None:
        """``model_uri``: a model directory, or ``registry:<alias or version>`` (then the registry is
        polled every ``serve.registry_poll_s`` and the model swapped when the alias moves)."""
        uri = user_config["model_uri"]
        self.source = uri
        if uri.startswith(REGISTRY):
            model_uri, vid = await asyncio.to_thread(self._resolve, uri[len(REGISTRY):])
            await self._swap(model_uri, vid, bool(user_config.get("force")))
            if self._follower is None or self._follower.done():
                self._follower = asyncio.get_running_loop().create_task(self._follow())
            return
        await self._swap(uri, None, bool(user_config.get("force")))

    def _resolve(self, ref: str) -> tuple[str, str]:
        from lm.registry import Registry

        version = Registry(self.store, self.cfg.registry_uri).get(ref)
        return version.model_uri, version.id

    async def _swap(self, uri: str, registry_version: str | None, force: bool = False) -> None:
        if uri == self.model_uri and self.engine is not None and not force:
            return
        engine, digest = await asyncio.to_thread(self._load, uri)
        # in-flight rows finish on the engine they started with
        old, self.engine, self.version, self.model_uri = self.engine, engine, registry_version or digest, uri
        if old is not None and hasattr(self.scheduler, "unload"):
            self.scheduler.unload(old)

    async def _follow(self) -> None:
        """While serving ``registry:<ref>``: re-resolve it now and then; a registry that cannot be read
        (or a model that cannot be loaded) leaves the current model serving."""
        import logging

        while self.source.startswith(REGISTRY):
            await asyncio.sleep(self.cfg.serve.registry_poll_s)
            try:
                model_uri, vid = await asyncio.to_thread(self._resolve, self.source[len(REGISTRY):])
                await self._swap(model_uri, vid)
            except Exception as err:  # keep serving what we have
                logging.getLogger("lmforge.serve").warning("registry follow: %s", err)

    def info(self) -> dict:
        return {"model_uri": self.model_uri, "version": self.version, "context_length": self.engine.context_length(),
                "cache": {"hits": self.cache.hits, "misses": self.cache.misses, "hit_rate": self.cache.hit_rate}}

    # --------------------------------------------------------------------------------- generation

    def _prepare(self, req: dict):
        """(engine, version, GenRequest, cache key) or an error dict the ingress turns into a 400."""
        from lm.serve.engine import GenRequest
        from lm.serve.grammar import json_grammar

        engine, version = self.engine, self.version
        limit, tok = engine.context_length(), engine.tokenizer
        prompt, extra = req["prompt"], {"model_uri": self.model_uri}  # the directory behind version (lm.lineage)
        if not isinstance(prompt, str):  # token ids
            if bad := [t for t in prompt if not 0 <= t < tok.vocab_size]:
                return {"error": f"the prompt holds token ids outside the vocabulary (0..{tok.vocab_size - 1}): "
                                 f"{bad[:3]}", "param": "prompt", "code": None}
            extra["prompt_text"] = tok.decode(prompt)
            if req.get("rag"):
                prompt = extra["prompt_text"]
        if req.get("rag"):  # the best passages that fit in front of the prompt (lm.rag)
            from lm.rag import augment

            query = req["rag"]["query"]
            hits = self.rag.search(query if isinstance(query, str) else tok.decode(query), req["rag"]["top_k"])
            budget = limit - req["max_tokens"]
            prompt, used = augment(self.cfg.rag.template, prompt, hits,
                                   lambda text: len(engine.tokenizer.encode(text)) <= budget)
            extra["sources"] = [{k: h[k] for k in ("id", "doc", "source", "score", "text")} for h in used]
        ids = (tok.encode(prompt) if isinstance(prompt, str) else list(prompt)) or [tok.eos_id]
        if len(ids) + req["max_tokens"] > limit:
            param = "prompt" if len(ids) >= limit else "max_tokens"
            return {"error": f"This model's maximum context length is {limit} tokens; the prompt has {len(ids)} and "
                             f"max_tokens asks for {req['max_tokens']} more.", "param": param}
        request = GenRequest(prompt_ids=ids, max_tokens=req["max_tokens"], temperature=req["temperature"],
                             top_p=req.get("top_p"), top_k=req.get("top_k"), seed=req.get("seed"),
                             stop=list(req.get("stop") or []), logprobs=bool(req.get("logprobs")),
                             top_logprobs=req.get("top_logprobs") or 0, logit_bias=req.get("logit_bias"),
                             presence_penalty=req.get("presence_penalty") or 0.0,
                             frequency_penalty=req.get("frequency_penalty") or 0.0,
                             prompt_logprobs=bool(req.get("prompt_logprobs")))
        try:
            request.grammar = json_grammar(req.get("response_format"))  # structured output (chat's response_format)
            engine.check(request)  # one bad request must not fail the batch it would join
        except ValueError as err:
            return {"error": str(err), "param": getattr(err, "param", None), "code": None}  # ArgumentError names it
        return engine, version, request, self.cache.key(version, req), extra

    def _cached(self, key: str | None) -> dict | None:
        if not key:
            return None
        cached = self.cache.get(key)
        self.m_cache.inc(tags={"result": "hit" if cached else "miss"})
        return cached

    async def embed(self, inputs: list) -> dict:
        """``inputs``: texts or token-id lists → ``{"embeddings", "prompt_tokens", "version", "model_uri"}`` (one unit
        vector per input, lm.inference.embed_ids) or an ``error`` naming the input that cannot be embedded."""
        from lm.inference import embed_ids

        engine, version, model_uri = self.engine, self.version, self.model_uri
        if not hasattr(engine, "model"):
            return {"error": "embeddings need the model in the replica (serve.engine_process: false)", "param": None}
        tok, limit = engine.tokenizer, engine.context_length()
        id_lists = []
        for i, item in enumerate(inputs):
            ids = tok.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                return {"error": f"input[{i}] is empty", "param": "input"}
            if len(ids) > limit:
                return {"error": f"input[{i}] has {len(ids)} tokens; this model reads at most {limit}",
                        "param": "input"}
            if bad := [t for t in ids if not 0 <= t < tok.vocab_size]:
                return {"error": f"input[{i}] holds token ids outside the vocabulary (0..{tok.vocab_size - 1}): "
                                 f"{bad[:3]}", "param": "input"}
            id_lists.append(ids)
        vectors = await asyncio.to_thread(embed_ids, engine.model, id_lists)
        return {"embeddings": vectors, "prompt_tokens": sum(map(len, id_lists)), "version": version,
                "model_uri": model_uri}

    async def complete(self, req: dict) -> dict:
        """One request, answered whole (one batched call, no per-step messages between processes):
        ``prompt_tokens``, ``version``, ``cached`` and the completion (or an ``error``)."""
        prepared = self._prepare(req)
        if isinstance(prepared, dict):
            return prepared
        engine, version, request, key, extra = prepared
        head = {"prompt_tokens": len(request.prompt_ids), "version": version, **extra}
        if (cached := self._cached(key)) is not None:
            return {**head, **cached, "cached": True}
        whole = _whole(request)
        async for out in self.scheduler.outputs(request, engine, whole=True):  # one message, at the end
            _add(whole, _chunk(out, request, engine.tokenizer))
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
        engine, version, request, key, extra = prepared
        tokenizer = engine.tokenizer
        head = {"prompt_tokens": len(request.prompt_ids), "version": version, **extra}
        if (cached := self._cached(key)) is not None:
            yield {**head, "cached": True}
            yield cached
            return
        yield head
        whole = _whole(request)
        async with contextlib.aclosing(self.scheduler.outputs(request, engine)) as outputs:  # client gone: row freed
            async for out in outputs:
                chunk = _chunk(out, request, tokenizer)
                if out.token_ids:
                    self.m_tokens.inc(len(out.token_ids))
                _add(whole, chunk)
                yield chunk
        if key and whole["finish_reason"]:
            self.cache.put(key, whole)


def _whole(request) -> dict:
    """An empty completion, to add a request's chunks to (_add)."""
    def listed() -> list | None:
        return [] if request.logprobs else None

    return {"text": "", "token_ids": [], "logprobs": listed(), "tokens": listed(), "token_bytes": listed(),
            "top_logprobs": listed(), "finish_reason": None}


def _chunk(out, request, tokenizer) -> dict:
    """A StepOutput as the ingress reads it: with logprobs, each token as text (``bytes:\\x..`` for part of a
    UTF-8 character, as OpenAI), its bytes, and its top logprobs as [text, bytes, logprob]."""
    def text(i: int) -> tuple[str, list[int]]:
        raw = tokenizer.token_bytes(i)
        try:
            return raw.decode(), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    chunk = {"text": out.text, "token_ids": out.token_ids, "logprobs": out.logprobs, "tokens": None,
             "token_bytes": None, "top_logprobs": None, "finish_reason": out.finish_reason}
    if request.logprobs:
        ids, lps, tops = out.token_ids, out.logprobs or [], out.top_logprobs or []
        if out.prompt_logprobs is not None:  # echo: the prompt's tokens come first (the first without any)
            ids, lps = [*request.prompt_ids, *ids], [*out.prompt_logprobs, *lps]
            tops = [*out.prompt_top_logprobs, *tops]
        pieces = [text(i) for i in ids]
        chunk["tokens"], chunk["token_bytes"], chunk["logprobs"] = [t for t, _ in pieces], [r for _, r in pieces], lps
        chunk["top_logprobs"] = [None if alts is None else [[*text(i), lp] for i, lp in alts] for alts in tops]
    return chunk


def _add(whole: dict, chunk: dict) -> None:
    whole["text"] += chunk["text"]
    for key in ("token_ids", "logprobs", "tokens", "token_bytes", "top_logprobs"):
        if whole[key] is not None:
            whole[key] += chunk[key] or []
    whole["finish_reason"] = chunk["finish_reason"] or whole["finish_reason"]
