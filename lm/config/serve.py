"""The ``serve`` section: the Ray Serve application (lm.serve.app) that hosts a model directory behind
an OpenAI-compatible API: where it listens, who may call it, what it accepts, how it batches, scales,
caches and records feedback."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from lm.config.base import PATH, Section


class AutoscalingConfig(Section):
    """Ray Serve ``autoscaling_config`` of the model deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(1, ge=1, description="Replicas at most.")
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="Ongoing requests per replica the autoscaler aims at.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must stay high this long before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Load must stay low this long before removing replicas.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class KeyLimits(Section):
    """A key's limits: beyond one, a request gets 429 with Retry-After. null = no limit. Enforced in each
    ingress replica (lm.serve.limits): with serve.colocate, each replica allows limit / max_replicas."""

    requests_per_minute: int | None = Field(None, ge=1, description="Requests a key may start per minute.")
    tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt + completion tokens a key may use per minute (counted as requests end).")
    max_concurrent: int | None = Field(None, ge=1, description="Requests of a key in flight at once.")


class FeedbackConfig(Section):
    """Capture of prompts, completions and feedback for continual learning (opt-in), redacted before anything is
    stored."""

    enabled: bool = Field(False, description="Record every completion and /v1/feedback call.")
    uri: Annotated[str | None, PATH] = Field(
        None, description="Storage prefix for the JSONL batches; null = <storage.root>/feedback.")
    flush_interval_s: float = Field(5.0, gt=0, description="Write a batch at least this often (when there is one).")
    flush_records: int = Field(256, ge=1, description="Write a batch as soon as it holds this many records.")
    redact: list[Literal["email", "card", "ip", "phone"]] = Field(
        default_factory=lambda: ["email", "card", "ip", "phone"], description="Personal data replaced by typed "
        "placeholders (<EMAIL>, <CARD_NUMBER>, <IP_ADDRESS>, <PHONE_NUMBER>) in prompts, completions and corrections "
        "before a record is buffered or written (lm.data.pii); [] = none. Secrets are always redacted, whatever this "
        "says: API keys (sk-..., AKIA..., this server's own keys, ...), bearer tokens, private-key blocks, passwords.")


class ResponsesConfig(Section):
    """Response records: metadata only (response id, model version and directory, time), one per response, written
    whatever serve.feedback says: where ``lm lineage <response id>`` starts. No prompt or completion text."""

    uri: Annotated[str | None, PATH] = Field(
        None, description="Storage prefix for the JSONL batches; null = <storage.root>/responses.")
    flush_interval_s: float = Field(5.0, gt=0, description="Write a batch at least this often (when there is one).")
    flush_records: int = Field(256, ge=1, description="Write a batch as soon as it holds this many records.")


class ServeConfig(Section):
    """Ray Serve: an OpenAI-compatible API (FastAPI ingress) in front of a batched model deployment."""

    host: str = Field("127.0.0.1", description="HTTP bind address (Serve's own default would be 0.0.0.0).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", pattern=r"^/", description="Where the API is mounted.")
    app_name: str = Field("lmforge", pattern=r"^[A-Za-z0-9_.-]+$", description="Serve application name.")
    model: Annotated[str | None, PATH] = Field(
        None, description="Model directory URI to serve, or registry:<alias|version> (registry:production follows "
        "the registry's production version as it moves); null = <run>/model.")
    registry_poll_s: float = Field(5.0, gt=0, description="How often replicas serving registry:<ref> re-read it.")
    model_name: str = Field("lmforge", description="Model id reported by /v1/models and required in requests.")
    # who may call
    api_keys_env: str = Field("LMFORGE_API_KEYS", description="Environment variable with comma-separated API keys.")
    api_keys_file: Annotated[str | None, PATH] = Field(
        None, description="YAML key file (a mounted secret): each key's name, role and limits (lm.serve.auth.KeyFile).")
    require_auth: bool = Field(
        True, description="Refuse requests without a valid bearer key; starting with no key configured is an error "
        "unless this is false (local use only).",
    )
    key_limits: KeyLimits = Field(
        default_factory=KeyLimits,
        description="Limits of the keys from api_keys_env, and of key-file keys that set none.")
    # what it accepts
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(4, ge=1, description="Largest n (completions per prompt).")
    max_prompts: int = Field(16, ge=1, description="Most prompts in one completions request.")
    max_embedding_inputs: int = Field(256, ge=1, description="Most inputs in one embeddings request.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    templates: dict[str, str] = Field(
        default_factory=dict, description="Named prompt templates a request may apply (\"template\": name): "
        "{prompt} is the request's prompt (chat: the last user message), other {fields} come from the "
        "request's template_vars.",
    )
    rag: bool = Field(
        False, description="Load the retrieval index (rag section, `lm rag build`) in every replica so requests "
        "may ask for \"rag\": the best passages go into the prompt and come back as sources.",
    )
    chat_template: Literal["plain"] = Field(
        "plain", description="plain: 'System: …\\n\\nUser: …\\n\\nAssistant:' turns, stopping at the next turn."
    )
    # how it runs
    max_batch_size: int = Field(8, ge=1, description="Rows decoded together: requests join the running batch "
                                "between decode steps (continuous batching, lm.serve.scheduler.BatchScheduler).")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="An idle replica waits this long for more requests before its first decode step.",
    )
    join_ratio: float = Field(
        0.25, ge=0, description="Waiting requests join a running batch once they number at least this fraction of "
        "its rows (one prefill for several), or after join_max_wait_steps steps; 0 = at the next step.",
    )
    join_max_wait_steps: int = Field(8, ge=0, description="The most decode steps a waiting request is held back.")
    colocate: bool = Field(
        False, description="The model in the HTTP ingress's own replicas (one deployment: no handle hop between "
        "processes per request, lower latency on few cores); false = an ingress deployment in front of separately "
        "scaled model replicas.")
    engine_process: bool = Field(
        False, description="Decode in a process of its own beside each model replica (no GIL shared with Serve's "
        "request handling); false = a thread in the replica.")
    max_ongoing_requests: int | None = Field(
        None, ge=1,
        description="Per model replica; null = 2 x max_batch_size (a batch decoding, the next ones waiting)."
    )
    replica_cpus: float = Field(1.0, gt=0, description="CPUs per model replica.")
    replica_gpus: float = Field(0.0, ge=0, description="GPUs per model replica.")
    ingress_cpus: float = Field(0.1, ge=0, description="CPUs of the HTTP ingress replica.")
    replica_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per model replica (e.g. {worker: 1}: one replica "
        "per node that offers one).",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Serve runs HTTP proxies: every node (behind a load balancer), or the head "
        "only (several nodes on one machine would otherwise bind the same port).",
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    failover_retries: int = Field(
        2, ge=0, description="A whole (non-streamed) request, or a stream before its first token, whose model replica "
        "dies is sent again to another replica this many times (with autoscaling.max_replicas >= 2 and a separate "
        "ingress); then, or with one replica, 503 with Retry-After.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a 503 when no model replica could answer.")
    quantize: Literal["none", "int8"] = Field("none", description="int8: dynamic int8 Linear layers (CPU replicas).")
    cache_entries: int = Field(
        1024, ge=0, description="Exact-match response cache for deterministic requests; 0 = off.")
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)

    @field_validator("templates")
    @classmethod
    def _check_templates(cls, value: dict[str, str]) -> dict[str, str]:
        from string import Formatter

        for name, text in value.items():
            try:
                fields = [f for _, f, _, _ in Formatter().parse(text) if f is not None]
            except ValueError as err:
                raise ValueError(f"template {name!r}: {err}") from None
            if "prompt" not in fields:
                raise ValueError(f"template {name!r} has no {{prompt}} field")
            if bad := [f for f in fields if not f.isidentifier()]:
                raise ValueError(f"template {name!r}: fields must be plain names, got {bad}")
        return value

    @model_validator(mode="after")
    def _batching(self) -> ServeConfig:
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) is below max_batch_size "
                             f"({self.max_batch_size}): batches could never fill")
        return self

    @property
    def ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size
