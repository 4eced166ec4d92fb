"""The Ray Serve application: an OpenAI-compatible FastAPI ingress (``Api``) in front of the batched
model deployment (lm.serve.model_server), or with the model in its own replicas (``serve.colocate``).

    lm serve -c configs/shakespeare-cpu.yaml              # runs until Ctrl-C (lm.serve.deploy); settings from serve.*
    build_app(cfg)                                        # the Serve application (serve.run / import_path app_builder)

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream`` as server-sent
events), ``POST /v1/embeddings``, ``GET /v1/models``, ``POST /v1/feedback``, ``GET /healthz``. The two
generation routes share one request pipeline (``Api._serve``: the model's streams or whole results, the
events or the response, usage, feedback capture), each with its adapter (lm.serve.routes: the model
requests a body asks for, the shape of its chunks and responses). Keys, limits, the declared body size
and the request metrics (every status) are the gate's (lm.serve.gate, middleware); bad requests get a 4xx
in OpenAI's error shape, never a 5xx; serve.feedback records; every response's id, model version and time
are recorded whatever serve.feedback says (serve.responses, metadata only: the start of ``lm lineage``).

(No ``from __future__ import annotations`` here: FastAPI must see the route parameters' real types
after Serve rewrites the methods into class-based routes.)
"""


import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from lm.config import Config, join_uri
from lm.serve import errors, schemas
from lm.serve.console.routes import ConsoleRoutes, add_routes
from lm.serve.console.stats import LiveStats, Tee
from lm.serve.errors import BadRequest, refused
from lm.serve.failover import Failover, guarded
from lm.serve.feedback import FeedbackLog, JsonlBatches
from lm.serve.gate import Gate, ServeMetrics, report_usage
from lm.serve.model_server import REGISTRY, ModelServer
from lm.serve.routes import ChatRoute, CompletionRoute, RouteAdapter
from lm.serve.scheduler import merge_streams
from lm.storage import ObjectStore

api = FastAPI(title="lmforge", description="OpenAI-compatible completions from an lmforge model directory.")


def _openapi() -> dict:
    return schemas.openapi_schema(api)  # the statuses the server answers, never FastAPI's 422


api.openapi = _openapi
api.add_middleware(Gate)
errors.install(api)
add_routes(api)  # the console (lm.serve.console): its page and /v1/console/ routes, methods of Api below


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.ingress(api)  # at import: each replica imports this module and gets the class-based routes
class Api(ConsoleRoutes):
    def __init__(self, model, cfg: Config, store: ObjectStore, grants: dict):
        """``model``: the model deployment's handle, or None to hold a ModelServer here (serve.colocate);
        ``grants``: key digest → lm.serve.auth.Grant (this replica's share of each key's limits)."""
        self.model, self.cfg, self.sc, self.store = model, cfg, cfg.serve, store
        self.local = ModelServer(cfg, store) if model is None else None
        # this replica's process: its gate's settings, and the request metrics the gate records (also into the
        # numbers the console shows)
        self.stats = LiveStats()
        Gate.configure(grants, self.sc.max_body_bytes, Tee(ServeMetrics(), self.stats))
        several = model is not None and self.sc.autoscaling.max_replicas >= 2  # another replica to fail over to
        self.failover = Failover(self.sc.failover_retries if several else 0, self.sc.retry_after_s)
        self.feedback = None
        if self.sc.feedback.enabled:
            fb = self.sc.feedback
            self.feedback = FeedbackLog(store, cfg.feedback_uri, flush_interval_s=fb.flush_interval_s,
                                        flush_records=fb.flush_records, redact=fb.redact, known_digests=grants)
        rc = self.sc.responses  # metadata of every response, capture or not (lm.lineage)
        self.responses = JsonlBatches(store, cfg.responses_uri, flush_interval_s=rc.flush_interval_s,
                                      flush_records=rc.flush_records)

    # ------------------------------------------------------------------------------------ checks

    async def _admit(self, request: Request) -> None:
        """The body's real size (lm.serve.gate checked the key and the declared size before it was read)."""
        size = len(await request.body())
        if size > self.sc.max_body_bytes:
            raise BadRequest(413, f"request body of {size} bytes exceeds {self.sc.max_body_bytes}", code="too_large")

    def __del__(self):
        """Serve shuts the replica down (gracefully): what the logs still buffer is written now."""
        for log in (getattr(self, "responses", None), getattr(self, "feedback", None)):
            if log is not None:
                log.flush()

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

    # --------------------------------------------------------------------------------- pipeline

    async def _serve(self, request: Request, route: RouteAdapter):
        """A generation request, whatever its route (lm.serve.routes): the model's streams or whole results,
        then a stream of server-sent events or one JSON response."""
        await self._admit(request)
        requests = route.requests()
        if route.body.stream:
            streams, heads = await self._open(requests)
        else:
            heads = await self._complete(requests)
        route.start(heads)
        self.responses.add(route.provenance())
        if route.body.stream:
            return StreamingResponse(guarded(self._events(request, route, streams, requests)),
                                     media_type="text/event-stream", headers={"x-lmforge-model-version": route.version})
        completion_tokens = sum(len(w["token_ids"]) for w in heads)
        self._finish(request, route, [w["text"] for w in heads], completion_tokens, requests)
        return JSONResponse({**route.response(completion_tokens), "system_fingerprint": route.version},
                            headers=route.headers())

    async def _events(self, request: Request, route: RouteAdapter, streams: list, requests: list[dict]):
        texts, tokens = [""] * len(streams), 0
        for chunk in route.opening():
            yield _sse(chunk)
        async for i, chunk in merge_streams(streams):
            texts[i] += chunk["text"]
            tokens += len(chunk["token_ids"])
            yield _sse(route.chunk(i, chunk))
        if route.body.usage_chunk():
            yield _sse(route.usage_chunk(schemas.usage(route.prompt_tokens(), tokens)))
        yield _sse("[DONE]")
        self._finish(request, route, texts, tokens, requests)

    def _finish(self, request: Request, route: RouteAdapter, texts: list[str], completion_tokens: int,
                requests: list[dict]) -> None:
        """The request has been answered: its tokens count against its key (lm.serve.gate) and in the console's
        numbers (with its cache lookups); feedback capture."""
        report_usage(request, route.prompt_tokens() + completion_tokens)
        self.stats.answered(completion_tokens, requests, route.heads)
        if self.feedback is not None:
            self.feedback.add(route.capture(texts))

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
        return await self._serve(request, CompletionRoute(self.cfg, body))

    @api.post("/v1/chat/completions", responses=schemas.REQUEST_ERRORS)
    async def chat(self, request: Request, body: schemas.ChatRequest):
        return await self._serve(request, ChatRoute(self.cfg, body))

    @api.post("/v1/embeddings", responses=schemas.REQUEST_ERRORS)
    async def embeddings(self, request: Request, body: schemas.EmbeddingRequest) -> dict:
        """One unit vector per input: the mean of the model's final hidden states (lm.inference.embed_ids)."""
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
        rid = schemas.new_id("emb")  # an id beside OpenAI's fields, so that `lm lineage` can start from it
        self.responses.add({"type": "embedding", "id": rid, "model_version": result["version"],
                            "model_uri": result.get("model_uri")})
        return {"id": rid, "system_fingerprint": result["version"], **schemas.embedding_response(
            body.model, result["embeddings"], body.encoding_format, result["prompt_tokens"])}

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
