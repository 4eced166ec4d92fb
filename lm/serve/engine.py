"""The serving engine: batched text generation for many requests at once, without Ray.

It owns one prefill of every prompt of a batch (left-padded, one KV cache), then one decode step at
a time for the rows still running, each row with its own sampling settings (temperature, top-k,
top-p, its own seeded generator), stop strings, end-of-text and token budget; and the incremental
detokenization that streams text without partial UTF-8 characters or text past a stop string.
The Ray Serve deployment (lm.serve.model_server) wraps it; nothing here knows about HTTP or Ray.

    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=8)   # lm.modeldir.load_model_dir
    reqs = [GenRequest(tok.encode("ROMEO:"), 64, temperature=0.8, seed=1, stop=["\\n\\n"])]
    engine.check(reqs[0])                    # ValueError if it cannot run (before it joins a batch)
    for step in engine.stream(reqs):         # one list per decode step, aligned with reqs
        for i, out in enumerate(step):       # StepOutput, or None once row i has finished
            ...out.text, out.token_ids, out.logprobs, out.finish_reason
    done = engine.generate(reqs)             # list[Completion], stream() run to the end

Guarantees: a request's output does not depend on what else is in its batch (greedy, and seeded
sampling: each row draws one uniform number per step from its own CPU ``torch.Generator``, and the
token is found by inverse CDF, so the draw is the same on CPU and GPU); greedy output equals
``Transformer.generate(..., temperature=0)``. ``logprobs`` are the model's own log-probabilities
(log-softmax of the raw logits, before temperature / top-k / top-p) of the chosen tokens. End-of-text
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

import torch

from lm.model import KVCache, Transformer
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


@dataclass
class StepOutput:
    """What one request gained in one decode step."""

    text: str  # new text since the previous step ("" while held back)
    token_ids: list[int]  # [] only at an end-of-text step
    logprobs: list[float] | None  # None unless the request asked for them
    finish_reason: str | None  # None while running; "stop" (eos / stop string) or "length" at the last step


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


# ------------------------------------------------------------------------------------- sampling


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [B, V], each row with its own settings ([B] tensors).

    temperature 0 = greedy (argmax); else logits / temperature, keep the values >= the top_k-th
    largest (top_k >= V: off), then the nucleus (tokens whose preceding mass is < top_p; top_p >= 1:
    off), as :func:`lm.model.sample_next` does; the token is drawn by inverse CDF with ``uniforms``
    (one number in [0, 1) per row), so a row's draw depends on its logits and its number only.
    """
    greedy = logits.argmax(dim=-1)
    sampled_rows = temperature > 0
    if not bool(sampled_rows.any()):
        return greedy
    V = logits.size(-1)
    scaled = logits.float() / torch.where(sampled_rows, temperature, 1.0)[:, None]
    values, order = scaled.sort(dim=-1, descending=True, stable=True)
    kth = values.gather(1, (top_k.clamp(1, V) - 1)[:, None])
    values = values.masked_fill(values < kth, float("-inf"))
    probs = values.softmax(dim=-1)
    outside = probs.cumsum(dim=-1) - probs >= top_p[:, None]  # the mass before this token reaches top_p
    probs = values.masked_fill(outside, float("-inf")).softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)
    # right=True: the first index whose cdf exceeds u·total, never a token of probability 0
    index = torch.searchsorted(cdf, uniforms[:, None].to(cdf) * cdf[:, -1:], right=True).clamp(max=V - 1)
    return torch.where(sampled_rows, order.gather(1, index).squeeze(1), greedy)


# ------------------------------------------------------------------------------- text of one row


class _RowText:
    """Incremental detokenization + stop strings for one row.

    Text is decoded over a small window of recent tokens (vLLM's prefix/read offsets) and released
    only when it ends on a whole character; the longest tail that could begin a stop string is held
    back until it either completes one (then cut there) or cannot any more. ``finish`` flushes.
    """

    def __init__(self, tokenizer: BPETokenizer, stop: list[str]):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of self.done
        self.done = ""  # the text of ids[:read], which ends on a whole character
        self.text = ""  # done + the whole characters decoded after it (cut at a stop string once found)
        self.sent = 0  # characters of self.text already released

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; return (text to release now, whether a stop string was found)."""
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        new = self.tok.decode(self.ids[self.prefix :])[len(before) :]
        if new and not new.endswith("\ufffd"):
            self.done += new
            self.prefix, self.read = self.read, len(self.ids)
            self.text = self.done
        else:  # a character still in pieces: what precedes it is final, so stop strings can match it now
            self.text = self.done + new.rstrip("\ufffd")
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        """Flush everything held back (a trailing partial character decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        self.done += self.tok.decode(self.ids[self.prefix :])[len(before) :]
        self.prefix = self.read = len(self.ids)
        self.text = self.done
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            out, self.sent = self.text[self.sent :], len(self.text)
            return out, True
        end = len(self.text)
        if not final:
            pending = self.text[self.sent :]
            for k in range(min(len(pending), self.longest - 1), 0, -1):
                if any(s.startswith(pending[-k:]) for s in self.stop):
                    end -= k
                    break
        out, self.sent = self.text[self.sent : end], end
        return out, False


@dataclass
class _Row:
    index: int  # position in the caller's request list
    req: GenRequest
    generator: torch.Generator
    text: _RowText
    n_tokens: int = 0


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
            texts: list[list[str]] = [[] for _ in chunk]
            ids: list[list[int]] = [[] for _ in chunk]
            lps: list[list[float]] = [[] for _ in chunk]
            reasons: list[str] = ["length"] * len(chunk)
            for step in self._steps(list(chunk)):
                for i, s in enumerate(step):
                    if s is None:
                        continue
                    texts[i].append(s.text)
                    ids[i] += s.token_ids
                    lps[i] += s.logprobs or []
                    if s.finish_reason:
                        reasons[i] = s.finish_reason
            out += [
                Completion("".join(texts[i]), ids[i], lps[i] if r.logprobs else None, reasons[i],
                           len(r.prompt_ids), len(ids[i]))
                for i, r in enumerate(chunk)
            ]
        return out

    def check(self, req: GenRequest, where: str = "request") -> None:
        """Raise ValueError (naming ``where``) if ``req`` cannot run on this model. stream() checks every
        request and one bad request fails the whole call, so check each before it joins a batch."""
        ctx, vocab = self.context_length(), self.model.cfg.vocab_size
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError(f"{where}: the prompt is empty; it needs at least one token")
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise ValueError(f"{where}: the prompt holds token ids outside [0, vocab_size={vocab})")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"{where}: max_tokens must be an int >= 1, got {req.max_tokens!r}")
        if n + req.max_tokens > ctx:
            raise ValueError(f"{where}: prompt of {n} tokens + max_tokens {req.max_tokens} = "
                             f"{n + req.max_tokens} exceeds the model's context length {ctx}")
        if not (req.temperature >= 0 and req.temperature != float("inf")):
            raise ValueError(f"{where}: temperature must be a finite number >= 0, got {req.temperature!r}")
        if req.top_k is not None and (not isinstance(req.top_k, int) or req.top_k < 1):
            raise ValueError(f"{where}: top_k must be an int >= 1 or None, got {req.top_k!r}")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise ValueError(f"{where}: top_p must be in (0, 1] or None, got {req.top_p!r}")

    # ------------------------------------------------------------------------------ the loop

    def _steps(self, requests: list[GenRequest]) -> Iterator[list[StepOutput | None]]:
        if not requests:
            return
        rows = [_Row(i, r, _generator(r.seed), _RowText(self.tokenizer, r.stop)) for i, r in enumerate(requests)]
        state = self._prefill(rows)
        while True:
            tokens, logprobs = self._sample(state, rows)
            outputs: list[StepOutput | None] = [None] * len(requests)
            keep = []
            for j, row in enumerate(rows):
                outputs[row.index] = out = self._advance(row, tokens[j], logprobs[j] if logprobs else None)
                if out.finish_reason is None:
                    keep.append(j)
            yield outputs
            if not keep:
                return
            rows = [rows[j] for j in keep]
            self._decode(state, keep)

    def _advance(self, row: _Row, token: int, logprob: float | None) -> StepOutput:
        """Account one sampled token to a row (Python side)."""
        req = row.req
        lps = [] if req.logprobs else None
        if token == self.tokenizer.eos_id and not req.ignore_eos:
            text, _ = row.text.finish()
            return StepOutput(text, [], lps, "stop")
        row.n_tokens += 1
        if lps is not None:
            lps.append(logprob)
        text, stopped = row.text.add(token)
        reason = "stop" if stopped else None
        if reason is None and row.n_tokens >= req.max_tokens:
            rest, stopped = row.text.finish()
            text, reason = text + rest, "stop" if stopped else "length"
        return StepOutput(text, [token], lps, reason)

    # --------------------------------------------------------------- tensor work (inference mode)

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> dict:
        lens = [len(r.req.prompt_ids) for r in rows]
        P, B, dev = max(lens), len(rows), self.device
        ids = torch.tensor([[0] * (P - len(r.req.prompt_ids)) + list(r.req.prompt_ids) for r in rows], device=dev)
        mask = torch.tensor([[0] * (P - n) + [1] * n for n in lens], device=dev)
        cache = KVCache(self.model.cfg, B, P + max(r.req.max_tokens for r in rows), device=dev,
                        dtype=self.cache_dtype)
        padded = min(lens) < P
        logits, _ = self.model(ids, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                               attention_mask=mask if padded else None, kv_cache=cache, last_only=True)
        return {"logits": logits[:, -1], "mask": mask, "cache": cache, "padded": padded,
                "pos": torch.tensor(lens, device=dev), "settings": _settings(rows, dev)}

    @torch.inference_mode()
    def _sample(self, state: dict, rows: list[_Row]) -> tuple[list[int], list[float] | None]:
        logits = state["logits"]
        temperature, top_k, top_p = state["settings"]
        uniforms = torch.tensor(
            [torch.rand(1, generator=r.generator).item() if r.req.temperature > 0 else 0.0 for r in rows],
            device=logits.device,
        )
        tokens = sample_rows(logits, temperature, top_k, top_p, uniforms)
        state["tokens"] = tokens
        if not any(r.req.logprobs for r in rows):
            return tokens.tolist(), None
        chosen = torch.log_softmax(logits.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens.tolist(), chosen.tolist()

    @torch.inference_mode()
    def _decode(self, state: dict, keep: list[int]) -> None:
        """Drop finished rows (and padding columns no kept row needs), then one forward of the rest."""
        cache: KVCache = state["cache"]
        tokens, mask, pos = state["tokens"], state["mask"], state["pos"]
        if len(keep) < tokens.numel():
            sel = torch.tensor(keep, device=tokens.device)
            tokens, mask, pos = tokens[sel], mask[sel], pos[sel]
            state["settings"] = tuple(t[sel] for t in state["settings"])
            trim = int(mask.any(dim=0).int().argmax())  # first column some kept row attends to
            cache.k, cache.v = cache.k[:, sel, :, trim:], cache.v[:, sel, :, trim:]
            cache.max_len -= trim
            cache.length -= trim
            mask = mask[:, trim:]
            state["padded"] = not bool(mask.all())
        mask = torch.cat([mask, mask.new_ones(len(keep), 1)], dim=1)
        logits, _ = self.model(tokens[:, None], position_ids=pos[:, None],
                               attention_mask=mask if state["padded"] else None, kv_cache=cache)
        state.update(logits=logits[:, -1], mask=mask, pos=pos + 1)


def _generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator()  # CPU: the same draws whatever device the model is on
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _settings(rows: list[_Row], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperature, top_k (huge = off) and top_p (2 = off) as [B] tensors."""
    temperature = torch.tensor([float(r.req.temperature) for r in rows], device=device)
    top_k = torch.tensor([r.req.top_k or 2**31 - 1 for r in rows], device=device)
    top_p = torch.tensor([r.req.top_p if r.req.top_p is not None and r.req.top_p < 1 else 2.0 for r in rows],
                         device=device)
    return temperature, top_k, top_p
