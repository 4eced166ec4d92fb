"""The Ray Serve application: an OpenAI-compatible FastAPI ingress (``Api``) in front of the batched
model deployment (lm.serve.model_server), or with the model in its own replicas (``serve.colocate``).

    lm serve -c configs/shakespeare-cpu.yaml              # runs until Ctrl-C (lm.serve.deploy); settings from serve.*
    build_app(cfg)                                        # the Serve application (serve.run / import_path app_builder)

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` as server-sent
events), ``GET /v1/models``, ``POST /v1/feedback``, ``GET /healthz``. Keys and body size are checked
first (lm.serve.gate); bad requests get a 4xx in OpenAI's error shape, never a 5xx; serve.feedback records.

(No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real types
after Serve rewrites the methods into class-based routes.)
"""


import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from lm.config import Config, join_uri
from lm.serve import errors, schemas
from lm.serve.errors import BadRequest, refused
from lm.serve.failover import Failover, guarded
from lm.serve.gate import Gate, report_usage
from lm.serve.model_server import REGISTRY, ModelServer
from lm.serve.scheduler import merge_streams
from lm.storage import ObjectStore

api = FastAPI(title="lmforge", description="OpenAI-compatible completions from an lmforge model directory.")


def _openapi() -> dict:
    return schemas.openapi_schema(api)  # the statuses the server answers, never FastAPI's 422


api.openapi = _openapi
api.add_middleware(Gate)
errors.install(api)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.ingress(api)  # at import: each replica imports this module and gets the class-based routes
class Api:
    def __init__(self, model, cfg: Config, store: ObjectStore, grants: dict):
        """``model``: the model deployment's handle, or None to hold a ModelServer here (serve.colocate);
        ``grants``: key digest → lm.serve.auth.Grant (this replica's share of each key's limits)."""
        from ray.serve.metrics import Counter, Histogram

        self.model, self.cfg, self.sc = model, cfg, cfg.serve
        self.local = ModelServer(cfg, store) if model is None else None
        Gate.configure(grants, self.sc.max_body_bytes)  # this replica's process: its gate's settings
        several = model is not None and self.sc.autoscaling.max_replicas >= 2  # another replica to fail over to
        self.failover = Failover(self.sc.failover_retries if several else 0, self.sc.retry_after_s)
        self.feedback = None
        if self.sc.feedback.enabled:
            from lm.serve.feedback import FeedbackLog

            fb = self.sc.feedback
            self.feedback = FeedbackLog(store, cfg.feedback_uri,
                                        flush_interval_s=fb.flush_interval_s, flush_records=fb.flush_records)
        self.m_requests = Counter("lmforge_requests", description="HTTP requests by route and status.",
                                  tag_keys=("route", "status"))
        self.m_latency = Histogram("lmforge_request_latency_ms", description="Request latency (ms).",
                                   boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000],
                                   tag_keys=("route",))

    # ------------------------------------------------------------------------------------ checks

    async def _admit(self, request: Request) -> None:
        """The body's real size (lm.serve.gate checked the key and the declared size before it was read)."""
        size = len(await request.body())
        if size > self.sc.max_body_bytes:
            raise BadRequest(413, f"request body of {size} bytes exceeds {self.sc.max_body_bytes}", code="too_large")

    def _check(self, body: schemas._Request, max_tokens: int, prompts: int) -> None:
        if body.model != self.sc.model_name:
            raise BadRequest(404, f"model {body.model!r} does not exist; this server has {self.sc.model_name!r}",
                             param="model", code="model_not_found")
        if max_tokens > self.sc.max_tokens_limit:
            raise BadRequest(400, f"max_tokens {max_tokens} exceeds this server's limit of {self.sc.max_tokens_limit}",
                             param="max_tokens")
        if body.n > self.sc.max_n:
            raise BadRequest(400, f"n {body.n} exceeds this server's limit of {self.sc.max_n}", param="n")
        if not 1 <= prompts <= self.sc.max_prompts:
            raise BadRequest(400, f"give 1 to {self.sc.max_prompts} prompts, got {prompts}", param="prompt")
        if len(body.stop_list()) > 4:
            raise BadRequest(400, "stop takes at most 4 sequences", param="stop")
        if (top_k := body.rag_top_k(self.cfg.rag.top_k)) is not None:
            if not self.sc.rag:
                raise BadRequest(400, "retrieval is off on this server (serve.rag)", param="rag")
            if top_k > self.cfg.rag.max_top_k:
                raise BadRequest(400, f"rag.top_k {top_k} exceeds this server's limit of {self.cfg.rag.max_top_k}",
                                 param="rag.top_k")

    def _templated(self, body: schemas._Request, prompt: str | list[int]) -> str | list[int]:
        """The prompt through the request's named template (serve.templates), if it names one."""
        if body.template is None:
            return prompt
        if not isinstance(prompt, str):
            raise BadRequest(400, "a template applies to text prompts, not token ids", param="template")
        try:
            return schemas.apply_template(self.sc.templates, body.template, prompt, body.template_vars)
        except ValueError as err:
            param = "template_vars" if "template_vars" in str(err) or "has no fields" in str(err) else "template"
            raise BadRequest(400, str(err), param=param) from None

    def _record(self, route: str, status: int, start: float) -> None:
        self.m_requests.inc(tags={"route": route, "status": str(status)})
        self.m_latency.observe((time.perf_counter() - start) * 1000, tags={"route": route})

    async def reconfigure(self, user_config: dict) -> None:
        """serve.colocate: the model's hot reload (lm.serve.model_server.ModelServer.reconfigure)."""
        await self.local.reconfigure(user_config)

    # ---------------------------------------------------------------------------------- streams

    def _stream(self, request: dict):
        if self.local is not None:
            return self.local.generate(request)
        return self.model.options(stream=True).generate.remote(request)

    async def _open(self, requests: list[dict]) -> tuple[list, list[dict]]:
        """Start one model stream per request and read each head (lm.serve.failover); a 400 if any is refused."""
        opened = await asyncio.gather(*(self.failover.open(lambda r=r: self._stream(r)) for r in requests))
        streams, heads = [s for s, _ in opened], [h for _, h in opened]
        for head in heads:
            if "error" in head:
                for s in streams:
                    await s.aclose() if self.local is not None else s.cancel()
                raise refused(head)
        return streams, heads

    async def _complete(self, requests: list[dict]) -> list[dict]:
        """Non-streamed requests: each answered whole by the model deployment (one reply, not one message
        per token); a 400 if any is refused."""
        complete = self.local.complete if self.local is not None else self.model.complete.remote
        results = await asyncio.gather(*(self.failover.call(lambda r=r: complete(r)) for r in requests))
        for result in results:
            if "error" in result:
                raise refused(result)
        return results

    def _requests(self, prompts: list, body: schemas._Request, max_tokens: int, stops: list[str],
                  top_logprobs: int | None, queries: list | None = None, echo: bool = False) -> list[dict]:
        """One model request per (prompt, choice); choice j of a seeded request uses seed + j. ``queries``:
        what retrieval looks up for each prompt (with ``rag``). ``top_logprobs``: None for no logprobs;
        ``echo`` with logprobs: the prompt tokens' too."""
        top_k = body.rag_top_k(self.cfg.rag.top_k)
        return [{"prompt": p, "max_tokens": max_tokens, "temperature": body.temperature,
                 "top_p": body.top_p if body.top_p < 1 else None, "top_k": body.top_k,
                 "seed": None if body.seed is None else body.seed + j, "stop": stops,
                 "logprobs": top_logprobs is not None, "top_logprobs": top_logprobs or 0,
                 "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                 "logit_bias": body.bias(), "prompt_logprobs": echo and top_logprobs is not None,
                 "rag": None if top_k is None else {"query": (queries or prompts)[i], "top_k": top_k}}
                for i, p in enumerate(prompts) for j in range(body.n)]

    def _capture(self, kind: str, rid: str, prompts: list[str], texts: list[str], version: str, body) -> None:
        if self.feedback is not None:
            self.feedback.add({"type": kind, "id": rid, "model_version": version, "prompts": prompts,
                               "completions": texts, "temperature": body.temperature, "seed": body.seed})

    # ----------------------------------------------------------------------------------- routes

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models", responses=schemas.AUTH_ERRORS)
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.sc.model_name, "object": "model", "created": 0,
                                            "owned_by": "lmforge"}]}

    @api.post("/v1/completions", responses=schemas.REQUEST_ERRORS)
    async def completions(self, request: Request, body: schemas.CompletionRequest):
        start = time.perf_counter()
        await self._admit(request)
        asked, max_tokens = body.prompts(), 16 if body.max_tokens is None else body.max_tokens
        self._check(body, max_tokens, len(asked))
        prompts = [self._templated(body, p) for p in asked]
        logprobs = body.logprobs is not None
        requests = self._requests(prompts, body, max_tokens, body.stop_list(), body.logprobs, asked, body.echo)
        if body.stream:
            streams, heads = await self._open(requests)
        else:
            heads = await self._complete(requests)
        rid, version = schemas.new_id("cmpl"), heads[0]["version"]
        prompt_tokens = sum(h["prompt_tokens"] for h in heads[:: body.n])

        def choice_logprobs(whole: dict) -> dict | None:
            return schemas.completion_logprobs(whole) if logprobs else None

        prompt_texts = [heads[i * body.n].get("prompt_text", p) for i, p in enumerate(prompts)]  # token ids as text

        def echoed(i: int) -> str:
            return prompt_texts[i // body.n] if body.echo else ""

        if body.stream:
            async def events():
                texts, tokens = [""] * len(streams), 0
                echo_first = [body.echo and logprobs] * len(streams)  # the echo goes with its logprobs
                for i, head in enumerate(heads):
                    if (body.echo and not logprobs) or "sources" in head:
                        chunk = schemas.completion_chunk(rid, body.model, i, "" if logprobs else echoed(i), None)
                        yield _sse(schemas.with_sources(chunk, head))
                async for i, chunk in merge_streams(streams):
                    texts[i] += chunk["text"]
                    tokens += len(chunk["token_ids"])
                    text = (echoed(i) if echo_first[i] else "") + chunk["text"]
                    echo_first[i] = False
                    yield _sse(schemas.completion_chunk(rid, body.model, i, text, chunk["finish_reason"],
                                                        choice_logprobs(chunk)))
                if body.usage_chunk():
                    usage = schemas.usage(prompt_tokens, tokens)
                    yield _sse(schemas.completion_chunk(rid, body.model, 0, "", None, usage_=usage))
                yield _sse("[DONE]")
                report_usage(request, prompt_tokens + tokens)
                self._capture("completion", rid, prompt_texts, texts, version, body)
                self._record("completions", 200, start)

            return StreamingResponse(guarded(events()), media_type="text/event-stream",
                                     headers={"x-lmforge-model-version": version})
        wholes = heads
        choices = [schemas.with_sources_choice({"text": echoed(i) + w["text"],
                                                "index": i, "logprobs": choice_logprobs(w),
                                                "finish_reason": w["finish_reason"]}, w)
                   for i, w in enumerate(wholes)]
        completion_tokens = sum(len(w["token_ids"]) for w in wholes)
        report_usage(request, prompt_tokens + completion_tokens)
        self._capture("completion", rid, prompt_texts, [w["text"] for w in wholes], version, body)
        self._record("completions", 200, start)
        response = schemas.completion_response(rid, body.model, choices, prompt_tokens, completion_tokens)
        cache = "hit" if all(h.get("cached") for h in heads) else "miss"
        return JSONResponse({**response, "system_fingerprint": version}, headers={"x-lmforge-cache": cache})

    @api.post("/v1/chat/completions", responses=schemas.REQUEST_ERRORS)
    async def chat(self, request: Request, body: schemas.ChatRequest):
        start = time.perf_counter()
        await self._admit(request)
        max_tokens = body.token_budget(self.cfg.generate.max_new_tokens)
        self._check(body, max_tokens, 1)
        messages, query = list(body.messages), ""
        if users := [i for i, m in enumerate(messages) if m.role == "user"]:
            query = messages[users[-1]].text()
            messages[users[-1]] = messages[users[-1]].model_copy(update={"content": self._templated(body, query)})
        prompt = schemas.chat_prompt(messages)
        stops = [*body.stop_list(), *schemas.CHAT_STOPS]
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = self._requests([prompt], body, max_tokens, stops, top_logprobs, [query or prompt])
        if (response_format := body.format()) is not None:  # structured output (lm.serve.grammar)
            requests = [{**r, "response_format": response_format} for r in requests]
        if body.stream:
            streams, heads = await self._open(requests)
        else:
            heads = await self._complete(requests)
        rid, version = schemas.new_id("chatcmpl"), heads[0]["version"]
        prompt_tokens = heads[0]["prompt_tokens"]

        if body.stream:
            async def events():
                texts, tokens = [""] * len(streams), 0
                for i, head in enumerate(heads):
                    chunk = schemas.chat_chunk(rid, body.model, i, {"role": "assistant", "content": ""}, None)
                    yield _sse(schemas.with_sources(chunk, head))
                async for i, chunk in merge_streams(streams):
                    texts[i] += chunk["text"]
                    tokens += len(chunk["token_ids"])
                    delta = {"content": chunk["text"]} if chunk["text"] else {}
                    lp = schemas.chat_logprobs(chunk) if body.logprobs else None
                    yield _sse(schemas.chat_chunk(rid, body.model, i, delta, chunk["finish_reason"], logprobs=lp))
                if body.usage_chunk():
                    usage = schemas.usage(prompt_tokens, tokens)
                    yield _sse(schemas.chat_chunk(rid, body.model, 0, {}, None, usage_=usage))
                yield _sse("[DONE]")
                report_usage(request, prompt_tokens + tokens)
                self._capture("chat", rid, [prompt], texts, version, body)
                self._record("chat", 200, start)

            return StreamingResponse(guarded(events()), media_type="text/event-stream",
                                     headers={"x-lmforge-model-version": version})
        wholes = heads
        choices = [schemas.with_sources_choice({"index": i, "message": {"role": "assistant", "content": w["text"].strip()},
                                                "logprobs": schemas.chat_logprobs(w) if body.logprobs else None,
                                                "finish_reason": w["finish_reason"]}, w)
                   for i, w in enumerate(wholes)]
        completion_tokens = sum(len(w["token_ids"]) for w in wholes)
        report_usage(request, prompt_tokens + completion_tokens)
        self._capture("chat", rid, [prompt], [w["text"] for w in wholes], version, body)
        self._record("chat", 200, start)
        response = schemas.chat_response(rid, body.model, choices, prompt_tokens, completion_tokens)
        return JSONResponse({**response, "system_fingerprint": version})

    @api.post("/v1/embeddings", responses=schemas.REQUEST_ERRORS)
    async def embeddings(self, request: Request, body: schemas.EmbeddingRequest) -> dict:
        """One unit vector per input: the mean of the model's final hidden states (lm.inference.embed_ids)."""
        start = time.perf_counter()
        await self._admit(request)
        if body.model != self.sc.model_name:
            raise BadRequest(404, f"model {body.model!r} does not exist; this server has {self.sc.model_name!r}",
                             param="model", code="model_not_found")
        inputs = body.inputs()
        if not 1 <= len(inputs) <= self.sc.max_embedding_inputs:
            raise BadRequest(400, f"give 1 to {self.sc.max_embedding_inputs} inputs, got {len(inputs)}", param="input")
        embed = self.local.embed if self.local is not None else self.model.embed.remote
        result = await self.failover.call(lambda: embed(inputs))
        if "error" in result:
            raise refused(result, generation=False)
        if body.dimensions is not None and body.dimensions != len(result["embeddings"][0]):
            raise BadRequest(400, f"dimensions {body.dimensions}: this model's embeddings have "
                                  f"{len(result['embeddings'][0])}", param="dimensions")
        report_usage(request, result["prompt_tokens"])
        self._record("embeddings", 200, start)
        return schemas.embedding_response(body.model, result["embeddings"], body.encoding_format, result["prompt_tokens"])

    @api.post("/v1/feedback", responses=schemas.REQUEST_ERRORS)
    async def feedback_route(self, request: Request, body: schemas.FeedbackRequest) -> dict:
        await self._admit(request)
        if self.feedback is None:
            raise BadRequest(404, "feedback capture is off on this server (serve.feedback.enabled)", code="disabled")
        if not body.has_content():
            raise BadRequest(400, "give a rating, a correction or both", param="rating")
        self.feedback.add({"type": "feedback", **body.model_dump()})
        return {"id": body.id, "object": "feedback", "recorded": True}


# -------------------------------------------------------------------------------------- the app


# Ray Serve's own latency settings for our replicas (a subset of its RAY_SERVE_THROUGHPUT_OPTIMIZED
# mode): user code and the handle router on the replica's main event loop instead of threads of
# their own (no cross-thread hops; our handlers never block: the decode loop has its own thread),
# request logs buffered instead of flushed per line, no copy of every log line on stderr. Measured
# with jobs/bench/serve.py's decomposition on the 2-core VM: about 4-5 ms less per request.
# glibc's allocator: few arenas, freed memory given back to the OS (jobs/bench/soak.py: without these the
# ingress's RSS grew 8.7% in 10 minutes while its Python heap stayed flat; malloc_trim gave most of it back).
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
               "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000", "RAY_SERVE_LOG_TO_STDERR": "0",
               "MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _replica_env() -> dict:
    return {"runtime_env": {"env_vars": dict(REPLICA_ENV)}}


def build_app(cfg: Config, store: ObjectStore | None = None):
    """The Serve application of ``cfg.serve`` (API keys are loaded here: a missing key fails now)."""
    from lm.serve.auth import grants, load_api_keys

    sc = cfg.serve
    cfg = cfg.with_absolute_paths()
    store = store or ObjectStore(cfg.storage)
    ingress_replicas = sc.autoscaling.max_replicas if sc.colocate else 1  # each enforces its share of the limits
    keys = grants(load_api_keys(sc), sc.key_limits, ingress_replicas)
    model_uri = sc.model or join_uri(cfg.run_uri, "model")
    if model_uri.startswith(REGISTRY):  # fail now (RegistryError) if the registry has no such version
        from lm.registry import Registry

        checked = Registry(store, cfg.registry_uri).get(model_uri[len(REGISTRY):]).model_uri
    else:
        checked = model_uri
    store.read_text(join_uri(checked, "config.json"))  # fail now (StorageNotFound naming it) if it is missing
    a = sc.autoscaling
    replicas = {"max_ongoing_requests": sc.ongoing_requests, "user_config": {"model_uri": model_uri},
                "autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                       "initial_replicas": max(a.min_replicas, 1),
                                       "target_ongoing_requests": a.target_ongoing_requests,
                                       "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
                "ray_actor_options": {"num_cpus": sc.replica_cpus, "num_gpus": sc.replica_gpus,
                                      "resources": sc.replica_resources, **_replica_env()}}
    if sc.colocate:  # one deployment: the model replicas answer HTTP themselves
        return serve.deployment(Api).options(name="model", **replicas).bind(None, cfg, store, keys)
    model = serve.deployment(ModelServer).options(name="model", **replicas).bind(cfg, store)
    ingress = serve.deployment(Api).options(
        name="api", ray_actor_options={"num_cpus": sc.ingress_cpus, **_replica_env()}, max_ongoing_requests=1000)
    return ingress.bind(model, cfg, store, keys)


def app_builder(args: dict):
    """For Serve config files: ``import_path: lm.serve.app:app_builder`` with ``args: {config, overrides}``."""
    from lm.config import load_config

    return build_app(load_config(args.get("config"), list(args.get("overrides") or [])))
