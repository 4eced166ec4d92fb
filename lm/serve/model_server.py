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
swaps the engine; rows already decoding finish on the engine they started with. With
``registry:production`` (``serve.model``) each replica loads the registry's production version and
re-reads the alias every ``serve.registry_poll_s``, swapping the same way when it moves (promotion,
rollback); responses then carry the registry's version id as ``system_fingerprint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lm.config import Config
from lm.storage import ObjectStore

REGISTRY = "registry:"  # serve.model = registry:production follows the registry's production version


class BatchScheduler:
    """Continuous batching on one engine: a decode thread steps one :class:`~lm.serve.engine.DecodeBatch`;
    a request that arrives joins it at the next step (prefilled and merged into the running KV cache,
    up to ``max_batch_size`` rows) and leaves the step it finishes, so nobody waits for a whole batch.

    The thread never waits for the event loop: it takes new requests and cancellations from an inbox
    between steps and hands each step's outputs to the loop in one ``call_soon_threadsafe``. (A worker
    -thread hop per step, ``asyncio.to_thread``, cost ~2.5 ms a step here; Serve's ``@serve.batch``
    runs whole batches one after another and measured batches of 1-2 under steady load.) Joining costs
    a prefill and a cache merge, so arrivals are held back until they number ``join_ratio`` x the
    running rows or have waited ``join_max_wait_steps`` steps (TGI's waiting_served_ratio and
    max_waiting_tokens; about +40% tok/s in one process at 16 closed-loop clients). After a hot reload,
    requests for the new engine wait until the rows on the old one have finished. ``wait_s``: an idle
    engine waits this long for a burst to arrive together. ``observe_batch(n)``: rows decoding
    together each time requests join."""

    def __init__(self, max_batch_size: int, observe_batch=lambda n: None, wait_s: float = 0.0,
                 join_ratio: float = 0.0, join_max_wait_steps: int = 0):
        self.max_batch_size, self.observe_batch, self.wait_s = max_batch_size, observe_batch, wait_s
        self.join_ratio, self.join_max_wait_steps = join_ratio, join_max_wait_steps
        self.queues: dict[int, asyncio.Queue] = {}  # key -> the request's StepOutputs, then None or an error
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", key, request, engine, whole) | ("cancel", key)
        self._keys = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def outputs(self, request, engine, whole: bool = False):
        """The request's StepOutputs as they come (``whole``: one StepOutput with everything, once it has
        finished: no event-loop work per step); closing this early takes the row out of the batch."""
        self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._decode_loop, name="lmforge-decode", daemon=True)
            self._thread.start()
        key = next(self._keys)
        outputs = self.queues[key] = asyncio.Queue()
        self.inbox.put(("add", key, request, self._engine_token(engine), whole))
        try:
            while (out := await outputs.get()) is not None:
                if isinstance(out, Exception):
                    raise out
                yield out
        finally:
            if self.queues.pop(key, None) is not None:  # left early (client gone, call cancelled): free its row
                self.inbox.put(("cancel", key))

    def _engine_token(self, engine):
        """How the decode loop's inbox names an engine (the engine itself, in this process)."""
        return engine

    def close(self) -> None:
        """Stop the decode thread (rows still running are dropped)."""
        if self._thread is not None:
            self.inbox.put(("stop",))
            self._thread.join()
            self._thread = None

    def _deliver(self, outputs: list, joined: int) -> None:
        """On the event loop: one step's (key, StepOutput | Exception) pairs to their requests."""
        if joined:
            self.observe_batch(joined)
        for key, out in outputs:
            if (outbox := self.queues.get(key)) is None:
                continue  # its caller left; the cancel is in the inbox
            outbox.put_nowait(out)
            if isinstance(out, Exception) or out.finish_reason is not None:
                if not isinstance(out, Exception):
                    outbox.put_nowait(None)
                del self.queues[key]

    def _decode_loop(self) -> None:
        def publish(outputs: list, joined: int) -> None:
            self._loop.call_soon_threadsafe(self._deliver, outputs, joined)

        decode_loop(self.inbox.get, self.inbox.empty, publish, self.settings(), engine_of=lambda engine: engine)

    def settings(self) -> dict:
        return {"max_batch_size": self.max_batch_size, "wait_s": self.wait_s, "join_ratio": self.join_ratio,
                "join_max_wait_steps": self.join_max_wait_steps}


def decode_loop(get: Callable[[], Any], empty: Callable[[], bool], publish: Callable[[list, int], None], settings: dict,
                engine_of: Callable[[Any], Any], on_message: Callable[[tuple], None] = lambda m: None) -> None:
    """The continuous-batching loop (see BatchScheduler), wherever it runs: ``get`` blocks for the next
    inbox message (None: nothing yet, look again), ``empty`` says whether more are queued, ``publish``
    hands a step's outputs on, ``engine_of`` turns a message's engine field into an Engine, and
    ``on_message`` takes any message other than add / cancel / stop."""
    max_batch_size, wait_s = settings["max_batch_size"], settings["wait_s"]
    join_ratio, join_max_wait_steps = settings["join_ratio"], settings["join_max_wait_steps"]
    batch, waiting, waited = None, [], False  # waiting: (key, request, engine) not yet in the batch
    held = 0  # steps the waiting requests have been held back
    partial: dict[int, Any] = {}  # key -> what a `whole` request has produced so far
    while True:
        messages = [] if batch or waiting else [get()]  # idle: sleep until a request comes
        while not empty():
            messages.append(get())
        for message in messages:
            if message is None:
                continue
            if message[0] == "stop":
                return
            if message[0] == "add":
                waiting.append((message[1], message[2], engine_of(message[3])))
                if message[4]:
                    partial[message[1]] = None
            elif message[0] == "cancel":
                waiting = [w for w in waiting if w[0] != message[1]]
                partial.pop(message[1], None)
                if batch:
                    batch.cancel(message[1])
            else:
                on_message(message)
        if not batch:
            if not waiting:
                continue
            if wait_s and not waited and len(waiting) < max_batch_size:
                time.sleep(wait_s)  # an idle engine: let a burst arrive together
                waited = True
                continue
            batch, waited = waiting[0][2].batch(), False
        joining = [w for w in waiting if w[2] is batch.engine][: batch.room()]
        if joining and batch and len(joining) < join_ratio * len(batch) and held < join_max_wait_steps:
            joining, held = [], held + 1  # too few to be worth a prefill yet: decode on
        else:
            held = 0
        taken = {w[0] for w in joining}
        waiting = [w for w in waiting if w[0] not in taken]
        outputs: list = []
        try:
            batch.add([request for _, request, _ in joining], [key for key, _, _ in joining])
        except Exception as err:  # refused requests hear why; the batch runs on
            outputs, joining = [(key, err) for key, _, _ in joining], []
        joined = len(batch) if joining else 0
        try:
            outputs += batch.step()
        except Exception as err:  # the engine failed: every row of the batch hears it
            outputs += [(row.key, err) for row in batch.rows]
            batch = None
        if partial:
            outputs = _gather_whole(outputs, partial)
        if outputs or joined:
            publish(outputs, joined)


def _gather_whole(outputs: list, partial: dict) -> list:
    """Hold back the steps of `whole` requests (keys in ``partial``), adding them up; release the sum
    when the request finishes (or its error at once)."""
    from lm.serve.engine import StepOutput

    released = []
    for key, out in outputs:
        if key not in partial:
            released.append((key, out))
        elif isinstance(out, Exception):
            del partial[key]
            released.append((key, out))
        else:
            so_far = partial[key]
            if so_far is not None:
                out = StepOutput(so_far.text + out.text, so_far.token_ids + out.token_ids,
                                 None if so_far.logprobs is None else so_far.logprobs + (out.logprobs or []),
                                 out.finish_reason)
            if out.finish_reason is None:
                partial[key] = out
            else:
                del partial[key]
                released.append((key, out))
    return released


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
        from lm.config import join_uri
        from lm.serve.engine import Engine
        from lm.storage import StorageNotFound

        try:
            lineage = json.loads(self.store.read_text(join_uri(uri, "lineage.json")))
        except StorageNotFound:
            lineage = {}
        version = hashlib.sha256(f"{uri}\n{json.dumps(lineage, sort_keys=True)}".encode()).hexdigest()[:12]
        if hasattr(self.scheduler, "load"):  # the engine process loads the weights
            return self.scheduler.load(uri), version
        from lm.modeldir import load_model_dir

        loaded = load_model_dir(self.store, uri)
        model = loaded.model.eval()
        if self.cfg.serve.quantize == "int8":
            from lm.serve.quantize import quantize_int8

            model = quantize_int8(model)
        return Engine(model, loaded.tokenizer, max_batch_size=self.cfg.serve.max_batch_size), version

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
        async for out in self.scheduler.outputs(request, engine, whole=True):  # one message, at the end
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
        async with contextlib.aclosing(self.scheduler.outputs(request, engine)) as outputs:  # client gone: row freed
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
