"""The per-route halves of the generation routes: lm.serve.app's request pipeline (``Api._serve``) runs every
generation request the same way (read the body, open the model streams or complete the requests, stream or
answer whole, report the tokens used, capture feedback); a :class:`RouteAdapter` says what differs per
route: which model requests a body asks for (checked against ``serve.*``: :class:`BadRequest` 4xx), how
a chunk, the stream's opening and usage chunks and the whole response are shaped, and what feedback
capture records. :class:`CompletionRoute` is ``POST /v1/completions``; :class:`ChatRoute` is
``POST /v1/chat/completions``. One adapter per request (it holds the request's id and heads).

    route = CompletionRoute(cfg, body)
    requests = route.requests()           # the model requests (one per prompt and choice), or BadRequest
    route.start(heads)                    # the model's heads (streamed) or whole results (not streamed)
    route.chunk(i, chunk) / route.response(completion_tokens) / route.capture(texts)
"""

from __future__ import annotations

from typing import Any

from lm.config import Config
from lm.serve import schemas
from lm.serve.errors import BadRequest


class RouteAdapter:
    """What a generation route adds to the shared pipeline (the completions and chat adapters below)."""

    kind = ""  # the feedback record's type
    id_prefix = ""  # the response id's

    def __init__(self, cfg: Config, body: Any):
        self.cfg, self.sc, self.body = cfg, cfg.serve, body
        self.rid, self.heads = "", []

    def requests(self) -> list[dict]:
        """The model requests this body asks for, checked (BadRequest)."""
        raise NotImplementedError

    def start(self, heads: list[dict]) -> None:
        """The model has accepted the requests: their heads (a stream's first message), or their whole
        results (not streamed), in request order."""
        self.rid, self.heads = schemas.new_id(self.id_prefix), heads

    @property
    def version(self) -> str:
        return self.heads[0]["version"]

    def prompt_tokens(self) -> int:
        return self.heads[0]["prompt_tokens"]

    def opening(self) -> list[dict]:
        """The chunks a stream sends before the model's first."""
        return []

    def chunk(self, i: int, chunk: dict) -> dict:
        raise NotImplementedError

    def usage_chunk(self, usage: dict) -> dict:
        raise NotImplementedError

    def response(self, completion_tokens: int) -> dict:
        """The whole (non-streamed) response, from the results given to :meth:`start`."""
        raise NotImplementedError

    def headers(self) -> dict[str, str]:
        """The whole response's own headers."""
        return {}

    def prompts(self) -> list[str]:
        """The prompts as feedback capture records them (text, also for token-id prompts)."""
        raise NotImplementedError

    def provenance(self) -> dict:
        """The response record of this request (metadata only, written for every response: lm.lineage)."""
        return {"type": self.kind, "id": self.rid, "model_version": self.version,
                "model_uri": self.heads[0].get("model_uri")}

    def capture(self, texts: list[str]) -> dict:
        """The feedback record of this request (lm.serve.feedback) with its choices' texts."""
        body = self.body
        return {"type": self.kind, "id": self.rid, "model_version": self.version, "prompts": self.prompts(),
                "completions": texts, "temperature": body.temperature, "seed": body.seed}

    # ---------------------------------------------------------------------- shared request building

    def _check(self, max_tokens: int, prompts: int) -> None:
        body, sc, rag = self.body, self.sc, self.cfg.rag
        if body.model != sc.model_name:
            raise BadRequest(404, f"model {body.model!r} does not exist; this server has {sc.model_name!r}",
                             param="model", code="model_not_found")
        if max_tokens > sc.max_tokens_limit:
            raise BadRequest(400, f"max_tokens {max_tokens} exceeds this server's limit of {sc.max_tokens_limit}",
                             param="max_tokens")
        if body.n > sc.max_n:
            raise BadRequest(400, f"n {body.n} exceeds this server's limit of {sc.max_n}", param="n")
        if not 1 <= prompts <= sc.max_prompts:
            raise BadRequest(400, f"give 1 to {sc.max_prompts} prompts, got {prompts}", param="prompt")
        if len(body.stop_list()) > 4:
            raise BadRequest(400, "stop takes at most 4 sequences", param="stop")
        if (top_k := body.rag_top_k(rag.top_k)) is not None:
            if not sc.rag:
                raise BadRequest(400, "retrieval is off on this server (serve.rag)", param="rag")
            if top_k > rag.max_top_k:
                raise BadRequest(400, f"rag.top_k {top_k} exceeds this server's limit of {rag.max_top_k}",
                                 param="rag.top_k")

    def _templated(self, prompt: str | list[int]) -> str | list[int]:
        """The prompt through the request's named template (serve.templates), if it names one."""
        body = self.body
        if body.template is None:
            return prompt
        if not isinstance(prompt, str):
            raise BadRequest(400, "a template applies to text prompts, not token ids", param="template")
        try:
            return schemas.apply_template(self.sc.templates, body.template, prompt, body.template_vars)
        except ValueError as err:
            param = "template_vars" if "template_vars" in str(err) or "has no fields" in str(err) else "template"
            raise BadRequest(400, str(err), param=param) from None

    def _requests(self, prompts: list, max_tokens: int, stops: list[str], top_logprobs: int | None,
                  queries: list, echo: bool = False) -> list[dict]:
        """One model request per (prompt, choice); choice j of a seeded request uses seed + j. ``queries``:
        what retrieval looks up for each prompt (with ``rag``). ``top_logprobs``: None for no logprobs;
        ``echo`` with logprobs: the prompt tokens' too."""
        body, top_k = self.body, self.body.rag_top_k(self.cfg.rag.top_k)
        return [{"prompt": p, "max_tokens": max_tokens, "temperature": body.temperature,
                 "top_p": body.top_p if body.top_p < 1 else None, "top_k": body.top_k,
                 "seed": None if body.seed is None else body.seed + j, "stop": stops,
                 "logprobs": top_logprobs is not None, "top_logprobs": top_logprobs or 0,
                 "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
                 "logit_bias": body.bias(), "prompt_logprobs": echo and top_logprobs is not None,
                 "rag": None if top_k is None else {"query": queries[i], "top_k": top_k}}
                for i, p in enumerate(prompts) for j in range(body.n)]


class CompletionRoute(RouteAdapter):
    """``POST /v1/completions``: prompts x n choices, ``echo`` (the prompt in front of each choice, with its
    logprobs when asked), the response cache's hit or miss in ``x-lmforge-cache``."""

    kind, id_prefix = "completion", "cmpl"
    body: schemas.CompletionRequest

    def requests(self) -> list[dict]:
        body = self.body
        asked, max_tokens = body.prompts(), 16 if body.max_tokens is None else body.max_tokens
        self._check(max_tokens, len(asked))
        self.sent = [self._templated(p) for p in asked]
        self.logprobs = body.logprobs is not None
        return self._requests(self.sent, max_tokens, body.stop_list(), body.logprobs, asked, body.echo)

    def start(self, heads: list[dict]) -> None:
        super().start(heads)
        n = self.body.n
        self.prompt_texts = [heads[i * n].get("prompt_text", p) for i, p in enumerate(self.sent)]  # ids as text
        self.echo_first = [self.body.echo and self.logprobs] * len(heads)  # a stream's echo goes with its logprobs

    def prompt_tokens(self) -> int:
        return sum(h["prompt_tokens"] for h in self.heads[:: self.body.n])

    def _echoed(self, i: int) -> str:
        return self.prompt_texts[i // self.body.n] if self.body.echo else ""

    def _logprobs(self, whole: dict) -> dict | None:
        return schemas.completion_logprobs(whole) if self.logprobs else None

    def opening(self) -> list[dict]:
        body = self.body
        return [schemas.with_sources(schemas.completion_chunk(self.rid, body.model, i, "" if self.logprobs
                                                              else self._echoed(i), None), head)
                for i, head in enumerate(self.heads) if (body.echo and not self.logprobs) or "sources" in head]

    def chunk(self, i: int, chunk: dict) -> dict:
        text = (self._echoed(i) if self.echo_first[i] else "") + chunk["text"]
        self.echo_first[i] = False
        return schemas.completion_chunk(self.rid, self.body.model, i, text, chunk["finish_reason"],
                                        self._logprobs(chunk))

    def usage_chunk(self, usage: dict) -> dict:
        return schemas.completion_chunk(self.rid, self.body.model, 0, "", None, usage_=usage)

    def response(self, completion_tokens: int) -> dict:
        choices = [schemas.with_sources_choice({"text": self._echoed(i) + w["text"], "index": i,
                                                "logprobs": self._logprobs(w), "finish_reason": w["finish_reason"]}, w)
                   for i, w in enumerate(self.heads)]
        return schemas.completion_response(self.rid, self.body.model, choices, self.prompt_tokens(), completion_tokens)

    def headers(self) -> dict[str, str]:
        return {"x-lmforge-cache": "hit" if all(h.get("cached") for h in self.heads) else "miss"}

    def prompts(self) -> list[str]:
        return self.prompt_texts


class ChatRoute(RouteAdapter):
    """``POST /v1/chat/completions``: the messages through the chat template (the last user message through
    the request's named template), ``response_format`` (structured output, lm.serve.grammar)."""

    kind, id_prefix = "chat", "chatcmpl"
    body: schemas.ChatRequest

    def requests(self) -> list[dict]:
        body = self.body
        max_tokens = body.token_budget(self.cfg.generate.max_new_tokens)
        self._check(max_tokens, 1)
        messages, query = list(body.messages), ""
        if users := [i for i, m in enumerate(messages) if m.role == "user"]:
            query = messages[users[-1]].text()
            messages[users[-1]] = messages[users[-1]].model_copy(update={"content": self._templated(query)})
        self.prompt = schemas.chat_prompt(messages)
        stops = [*body.stop_list(), *schemas.CHAT_STOPS]
        top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
        requests = self._requests([self.prompt], max_tokens, stops, top_logprobs, [query or self.prompt])
        if (response_format := body.format()) is not None:  # structured output (lm.serve.grammar)
            requests = [{**r, "response_format": response_format} for r in requests]
        return requests

    def _logprobs(self, whole: dict) -> dict | None:
        return schemas.chat_logprobs(whole) if self.body.logprobs else None

    def opening(self) -> list[dict]:
        return [schemas.with_sources(schemas.chat_chunk(self.rid, self.body.model, i,
                                                        {"role": "assistant", "content": ""}, None), head)
                for i, head in enumerate(self.heads)]

    def chunk(self, i: int, chunk: dict) -> dict:
        delta = {"content": chunk["text"]} if chunk["text"] else {}
        return schemas.chat_chunk(self.rid, self.body.model, i, delta, chunk["finish_reason"],
                                  logprobs=self._logprobs(chunk))

    def usage_chunk(self, usage: dict) -> dict:
        return schemas.chat_chunk(self.rid, self.body.model, 0, {}, None, usage_=usage)

    def response(self, completion_tokens: int) -> dict:
        choices = [schemas.with_sources_choice({"index": i,
                                                "message": {"role": "assistant", "content": w["text"].strip()},
                                                "logprobs": self._logprobs(w), "finish_reason": w["finish_reason"]}, w)
                   for i, w in enumerate(self.heads)]
        return schemas.chat_response(self.rid, self.body.model, choices, self.prompt_tokens(), completion_tokens)

    def prompts(self) -> list[str]:
        return [self.prompt]
