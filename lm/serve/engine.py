"""The serving engine: batched text generation for many requests at once, without Ray.

It owns the running batch (:class:`DecodeBatch`, continuous batching): new requests are prefilled
(left-padded) and merged into the batch's KV cache between decode steps, each row with its own
sampling settings (temperature, top-k, top-p, OpenAI's presence / frequency penalties and logit_bias,
its own seeded generator; lm.serve.sampling), stop strings, end-of-text, token budget and, for structured
output, its own grammar (``GenRequest.grammar``: before sampling, the tokens the grammar forbids get -inf in
that row only; the row ends "stop" when the grammar is complete; stop strings do not apply; lm.serve.grammar),
and leaves the step it finishes; and the incremental
detokenization (lm.serve.text) that streams text without partial UTF-8 characters or text past a
stop string. The Ray Serve deployment (lm.serve.model_server) wraps it; nothing here knows about
HTTP or Ray.

    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=8)   # lm.modeldir.load_model_dir
    reqs = [GenRequest(tok.encode("ROMEO:"), 64, temperature=0.8, seed=1, stop=["\\n\\n"])]
    engine.check(reqs[0])                    # ValueError if it cannot run (before it joins a batch)
    for step in engine.stream(reqs):         # one list per decode step, aligned with reqs
        for i, out in enumerate(step):       # StepOutput, or None once row i has finished
            ...out.text, out.token_ids, out.logprobs, out.finish_reason
    done = engine.generate(reqs)             # list[Completion], stream() run to the end
    batch = engine.batch()                   # continuous batching: see DecodeBatch

Guarantees: a request's output does not depend on what else is in its batch (greedy, and seeded
sampling: each row draws one uniform number per step from its own CPU ``torch.Generator``, and the
token is found by inverse CDF, so the draw is the same on CPU and GPU); greedy output equals
``Transformer.generate(..., temperature=0)``. ``logprobs`` (and ``top_logprobs``, the k likeliest) are the
model's own log-probabilities (log-softmax of the raw logits, before logit_bias, penalties, a grammar's mask,
temperature / top-k / top-p) of the chosen tokens; with ``prompt_logprobs`` (echo) a row's first output also
carries those of its prompt tokens, from the prefill's own logits, and ``max_tokens=0`` rows end there
("length"). End-of-text
ends a row (finish_reason "stop") and is neither returned nor counted; a stop string ends it too, the
token that completed it is kept in ``token_ids`` but the text is cut before the stop string.

Threads: an Engine holds no per-call state, and ``stream()`` keeps everything in its generator, so
several generators may exist at once (they share the CPU/GPU). Each generator step enters
``torch.inference_mode`` on its own, so a generator may be advanced from different threads one
step at a time (e.g. ``await asyncio.to_thread(next, it, None)`` per step in an async handler).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lm.model import KVCache, Transformer
from lm.serve import grammar
from lm.serve.batch_state import generator, merge, settings
from lm.serve.sampling import adjust_logits, check_request, prompt_logprobs, sample_rows, top_logprobs
from lm.serve.text import RowText
from lm.tokenizer import BPETokenizer


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None  # None or >= 1: off
    top_k: int | None = None
    seed: int | None = None  # per-request generator: same seed + same prompt -> same text, whatever the batch
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False  # return the chosen token's logprob per token
    ignore_eos: bool = False
    top_logprobs: int = 0  # with logprobs: also the k likeliest tokens per token
    presence_penalty: float = 0.0  # OpenAI's: minus presence·(count > 0) per token generated so far
    frequency_penalty: float = 0.0  # minus frequency·count
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (and top_logprobs), in the first output
    grammar: str | None = None  # llguidance grammar (lm.serve.grammar.json_grammar): constrained decoding


@dataclass
class StepOutput:
    """What one request gained in one decode step."""

    text: str  # new text since the previous step ("" while held back)
    token_ids: list[int]  # [] only at an end-of-text step
    logprobs: list[float] | None  # None unless the request asked for them
    finish_reason: str | None  # None while running; "stop" (eos / stop string) or "length" at the last step
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, (id, logprob) likeliest first
    # with prompt_logprobs, in a row's first output: per prompt token (None for the first, which has no context)
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None  # with GenRequest.prompt_logprobs (see StepOutput)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


@dataclass
class _Row:
    key: Any  # the caller's name for the request (its index, for stream())
    req: GenRequest
    generator: torch.Generator
    text: RowText
    n_tokens: int = 0
    prompt_scores: tuple | None = None  # (logprobs, top logprobs) of the prompt, until the first output
    matcher: Any = None  # the row's grammar state (llguidance.LLMatcher), None without a grammar


# -------------------------------------------------------------------------------------- engine


class Engine:
    """Batched generation over one model + tokenizer; see the module docstring."""

    def __init__(self, model: Transformer, tokenizer: BPETokenizer, *, max_batch_size: int = 8):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.device = model.rope_cos.device
        self.cache_dtype = model.model.embed_tokens.weight.dtype

    def context_length(self) -> int:
        return self.model.cfg.max_seq_len

    # ------------------------------------------------------------------------------ public API

    def batch(self) -> DecodeBatch:
        """An empty running batch for continuous batching (rows join between steps)."""
        return DecodeBatch(self)

    def stream(self, requests: list[GenRequest]) -> Iterator[list[StepOutput | None]]:
        """One prefill of all prompts (left-padded, KV cache), then one decode step at a time for the
        rows still running; yields per step a list aligned with ``requests``: a StepOutput for rows
        that produced something (the row's last one carries finish_reason), None for rows already
        finished. Rows finish independently (own max_tokens, stop strings, eos).

        Requests are checked here, before the first step (ValueError naming ``requests[i]``); at
        most ``max_batch_size`` of them. Closing the generator early stops the whole batch."""
        if len(requests) > self.max_batch_size:
            raise ValueError(f"{len(requests)} requests exceed max_batch_size {self.max_batch_size}")
        for i, req in enumerate(requests):
            self.check(req, f"requests[{i}]")
        return self._steps(list(requests))

    def generate(self, requests: list[GenRequest]) -> list[Completion]:
        """Every request to the end (``max_batch_size`` at a time), in order."""
        for i, req in enumerate(requests):
            self.check(req, f"requests[{i}]")
        out: list[Completion] = []
        for start in range(0, len(requests), self.max_batch_size):
            chunk = requests[start : start + self.max_batch_size]
            whole = [Completion("", [], [] if r.logprobs else None, "length", len(r.prompt_ids), 0,
                                [] if r.logprobs else None) for r in chunk]
            for step in self._steps(list(chunk)):
                for c, s in zip(whole, step, strict=True):
                    if s is not None:
                        c.text += s.text
                        c.token_ids += s.token_ids
                        c.completion_tokens += len(s.token_ids)
                        if c.logprobs is not None:
                            c.logprobs += s.logprobs or []
                            c.top_logprobs += s.top_logprobs or []
                        c.finish_reason = s.finish_reason or c.finish_reason
                        if s.prompt_logprobs is not None:
                            c.prompt_logprobs, c.prompt_top_logprobs = s.prompt_logprobs, s.prompt_top_logprobs
            out += whole
        return out

    def check(self, req: GenRequest, where: str = "request") -> None:
        """Raise ValueError (naming ``where``) if ``req`` cannot run on this model. stream() checks every
        request and one bad request fails the whole call, so check each before it joins a batch."""
        check_request(req, self.context_length(), self.model.cfg.vocab_size, where)
        if req.grammar is not None:
            grammar.check(req.grammar, self.tokenizer, where)

    def _steps(self, requests: list[GenRequest]) -> Iterator[list[StepOutput | None]]:
        batch = self.batch()
        batch.add(requests, list(range(len(requests))))
        while batch:
            outputs: list[StepOutput | None] = [None] * len(requests)
            for i, out in batch.step():
                outputs[i] = out
            yield outputs


class DecodeBatch:
    """The rows decoding together on one engine: continuous batching.

    ``add`` prefills new requests (left-padded among themselves) and merges them into the running
    KV cache between steps (both sides left-padded to the same number of columns); ``step`` samples
    one token for every row, accounts it, drops finished rows and runs one decode forward for the
    rest. A row's output is the same whenever it joins: its positions, mask and generator are its own.

        batch = engine.batch()
        batch.add([req_a, req_b], keys=["a", "b"])
        while batch:
            for key, out in batch.step():       # (key, StepOutput); out.finish_reason on the last
                ...
            batch.add([req_c], keys=["c"])       # joins the running rows at the next step
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: list[_Row] = []
        self.state: dict = {}

    def __len__(self) -> int:
        return len(self.rows)

    def room(self) -> int:
        return self.engine.max_batch_size - len(self.rows)

    def add(self, requests: list[GenRequest], keys: list) -> None:
        """Prefill ``requests`` (checked first: ValueError naming the key) and merge them in."""
        if not requests:
            return
        if len(requests) > self.room():
            raise ValueError(f"{len(requests)} requests do not fit: {len(self.rows)} of max_batch_size "
                             f"{self.engine.max_batch_size} running")
        for key, req in zip(keys, requests, strict=True):
            self.engine.check(req, f"requests[{key!r}]")
        tok = self.engine.tokenizer
        rows = [_Row(k, r, generator(r.seed), RowText(tok, [] if r.grammar else r.stop),  # a grammar decides the end
                     matcher=grammar.matcher(r.grammar, tok) if r.grammar else None)
                for k, r in zip(keys, requests, strict=True)]
        state = self._prefill(rows)
        self.state = merge(self.state, state, self.rows, rows) if self.rows else state
        self.rows += rows

    def cancel(self, key) -> bool:
        """Drop the row named ``key`` before the next step; False if it is not running."""
        keep = [j for j, r in enumerate(self.rows) if r.key != key]
        if len(keep) == len(self.rows):
            return False
        self._select(keep)
        return True

    def step(self) -> list[tuple[Any, StepOutput]]:
        """One token for every row: [(key, StepOutput)]; finished rows leave the batch."""
        if not self.rows:
            return []
        tokens, logprobs, tops = self._sample()
        outputs, keep = [], []
        for j, row in enumerate(self.rows):
            out = self._advance(row, tokens[j], logprobs[j] if logprobs else None, tops[j] if tops else None)
            outputs.append((row.key, out))
            if out.finish_reason is None:
                keep.append(j)
        self._select(keep)
        if self.rows:
            self._decode()
        return outputs

    def _advance(self, row: _Row, token: int, logprob: float | None, top: list | None) -> StepOutput:
        """Account one sampled token to a row (Python side)."""
        req = row.req
        lps, tops = ([], []) if req.logprobs else (None, None)
        first = dict(zip(("prompt_logprobs", "prompt_top_logprobs"), row.prompt_scores or (), strict=False))
        row.prompt_scores = None
        if req.max_tokens == 0:  # the prompt's logprobs only (echo)
            return StepOutput("", [], lps, "length", tops, **first)
        if token == self.engine.tokenizer.eos_id and not (req.ignore_eos and row.matcher is None):
            text, _ = row.text.finish()  # a grammar allows end-of-text only where it accepts
            reason = "stop" if grammar.accepts(row.matcher) else "length"
            if not req.prompt_logprobs or lps is None:
                return StepOutput(text, [], lps, reason, tops, **first)
            # echo scoring (lm-eval's local-completions reads the prompt's logprobs as all but the last): the
            # end-of-text is reported as the token generated, with its logprob, as OpenAI and vLLM report it
            lps.append(logprob)
            tops.append((top or [])[: req.top_logprobs])
            return StepOutput(text, [token], lps, reason, tops, **first)
        row.n_tokens += 1
        if lps is not None:
            lps.append(logprob)
            tops.append((top or [])[: req.top_logprobs])
        text, stopped = row.text.add(token)
        reason = "stop" if stopped else None
        if row.matcher is not None and (reason := grammar.advance(row.matcher, token)):
            text += row.text.finish()[0]  # the grammar is complete ("stop"), or failed ("length")
        if reason is None and row.n_tokens >= req.max_tokens:
            rest, stopped = row.text.finish()
            text, reason = text + rest, "stop" if stopped else "length"
        return StepOutput(text, [token], lps, reason, tops, **first)

    # --------------------------------------------------------------- tensor work (inference mode)

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> dict:
        eng = self.engine
        lens = [len(r.req.prompt_ids) for r in rows]
        P, B, dev = max(lens), len(rows), eng.device
        ids = torch.tensor([[0] * (P - len(r.req.prompt_ids)) + list(r.req.prompt_ids) for r in rows], device=dev)
        mask = torch.tensor([[0] * (P - n) + [1] * n for n in lens], device=dev)
        cache = KVCache(eng.model.cfg, B, P + max(r.req.max_tokens for r in rows), device=dev, dtype=eng.cache_dtype)
        padded = min(lens) < P
        scored = [j for j, r in enumerate(rows) if r.req.prompt_logprobs]  # echo: every position's logits
        logits, _ = eng.model(ids, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                              attention_mask=mask if padded else None, kv_cache=cache, last_only=not scored)
        for j in scored:  # row j's prompt: its last lens[j] columns, [n, V]
            rows[j].prompt_scores = prompt_logprobs(logits[j, P - lens[j] :], rows[j].req.prompt_ids,
                                                    rows[j].req.top_logprobs)
        return {"logits": logits[:, -1], "mask": mask, "cache": cache, "padded": padded,
                "pos": torch.tensor(lens, device=dev), "settings": settings(rows, dev)}

    @torch.inference_mode()
    def _sample(self) -> tuple[list[int], list[float] | None, list | None]:
        """A token per row (after its logit_bias and penalties); if a row asked, logprobs and top logprobs."""
        rows, state = self.rows, self.state
        logits = raw = state["logits"]
        temperature, top_k, top_p = state["settings"]
        uniforms = torch.tensor(
            [torch.rand(1, generator=r.generator).item() if r.req.temperature > 0 else 0.0 for r in rows],
            device=logits.device,
        )
        if any(r.req.presence_penalty or r.req.frequency_penalty or r.req.logit_bias for r in rows):
            logits = adjust_logits(raw, [r.text.ids for r in rows], [r.req.presence_penalty for r in rows],
                                   [r.req.frequency_penalty for r in rows], [r.req.logit_bias for r in rows])
        if any(r.matcher is not None for r in rows):  # structured output: each grammar row's allowed tokens
            logits = grammar.mask_logits(logits, [r.matcher for r in rows], self.engine.tokenizer)
        tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)
        state["tokens"] = tokens
        if not any(r.req.logprobs for r in rows):
            return tokens.tolist(), None, None
        chosen, tops = top_logprobs(raw, tokens, max(r.req.top_logprobs for r in rows))
        return tokens.tolist(), chosen, tops

    @torch.inference_mode()
    def _select(self, keep: list[int]) -> None:
        """Keep only rows ``keep``: kept rows beyond the new row count move into the places freed below
        it (a copy of those rows' cache, not of the whole cache), then the cache is narrowed (a view).
        Leading cache columns no row needs any more are dropped at the next merge."""
        state, n = self.state, len(keep)
        if n == len(self.rows):
            return
        if not keep:
            self.rows, self.state = [], {}
            return
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))  # new position -> old position
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        self.rows = [self.rows[i] for i in order]
        cache: KVCache = state["cache"]
        dev = state["mask"].device
        if holes:
            dst, src = torch.tensor(holes, device=dev), torch.tensor(movers, device=dev)
            cache.k[:, dst], cache.v[:, dst] = cache.k[:, src], cache.v[:, src]
        cache.k, cache.v = cache.k[:, :n], cache.v[:, :n]
        index = torch.tensor(order, device=dev)
        for name in ("mask", "pos", "logits", "tokens"):
            if name in state:
                state[name] = state[name][index]
        state["settings"] = tuple(t[index] for t in state["settings"])
        state["padded"] = not bool(state["mask"].all())

    @torch.inference_mode()
    def _decode(self) -> None:
        """One forward of every row's last sampled token."""
        state = self.state
        cache: KVCache = state["cache"]
        tokens, mask, pos = state["tokens"], state["mask"], state["pos"]
        mask = torch.cat([mask, mask.new_ones(len(self.rows), 1)], dim=1)
        logits, _ = self.engine.model(tokens[:, None], position_ids=pos[:, None],
                                      attention_mask=mask if state["padded"] else None, kv_cache=cache)
        state.update(logits=logits[:, -1], mask=mask, pos=pos + 1)
        del state["tokens"]


