"""lm.serve.engine: batch independence, greedy = Transformer.generate, seeds, stop strings, eos, length,
logprobs, incremental text, per-row sampling, validation, stepping from other threads."""

from __future__ import annotations

import copy
import dataclasses
import threading

import pytest
import torch
from tokenizers import pre_tokenizers

from lm.serve.engine import Engine, GenRequest
from lm.serve.sampling import adjust_logits, sample_rows, top_logprobs
from lm.serve.text import RowText

CTX = 64


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer


@pytest.fixture(scope="module")
def model(tok, small_model):
    return small_model(tok, max_seq_len=CTX, init_std=0.3)


@pytest.fixture(scope="module")
def engine(model, tok):
    return Engine(model, tok, max_batch_size=8)


def req(tok, prompt: str, n: int, **kw) -> GenRequest:
    return GenRequest(tok.encode(prompt), n, **kw)


def mixed(tok) -> list[GenRequest]:
    """Different prompt lengths, budgets and settings (the longest prompt finishes first)."""
    return [
        req(tok, "ROMEO: what light through yonder window breaks", 3, temperature=0, ignore_eos=True),
        req(tok, "To", 25, temperature=0.9, seed=11, top_k=50, logprobs=True),
        req(tok, "First Citizen:", 12, temperature=1.3, seed=5, top_p=0.8),
        req(tok, "Speak", 18, temperature=0, logprobs=True, ignore_eos=True),
        req(tok, "KING", 9, temperature=0.7, seed=2, top_k=5, top_p=0.9, ignore_eos=True),
    ]


def same(a, b) -> None:
    assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    assert (a.logprobs is None) == (b.logprobs is None)
    if a.logprobs is not None:
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


# --------------------------------------------------------------------------- batch independence


def test_output_does_not_depend_on_the_batch(engine, tok):
    reqs = mixed(tok)
    alone = [engine.generate([r])[0] for r in reqs]
    together = engine.generate(reqs)
    for a, b in zip(alone, together, strict=True):
        same(a, b)
    reversed_ = engine.generate(reqs[::-1])[::-1]
    for a, b in zip(alone, reversed_, strict=True):
        same(a, b)
    assert [len(c.token_ids) for c in alone][:1] == [3]
    assert alone[1].text != alone[3].text  # the rows really differ


def test_rows_joining_a_running_batch_get_what_they_get_alone(engine, tok):
    """Continuous batching: requests join between decode steps (longer and shorter prompts than the
    running rows, so both sides of the merge are left-padded) and leave when done; each row's output
    equals its output alone, greedy and seeded."""
    reqs = mixed(tok)
    alone = {i: engine.generate([r])[0] for i, r in enumerate(reqs)}
    got: dict[int, list] = {i: [] for i in range(len(reqs))}
    batch = engine.batch()
    batch.add([reqs[1], reqs[3]], keys=[1, 3])
    joins = {2: [0, 2], 4: [4]}  # after step 2: the longest prompt + another; after step 4: one more
    step, sizes = 0, []
    while batch:
        for key, out in batch.step():
            got[key].append(out)
        step += 1
        if step in joins:
            batch.add([reqs[k] for k in joins[step]], keys=joins[step])
        sizes.append(len(batch))
    assert max(sizes) == 5
    for i, outs in got.items():
        merged = "".join(o.text for o in outs), [t for o in outs for t in o.token_ids], outs[-1].finish_reason
        assert merged == (alone[i].text, alone[i].token_ids, alone[i].finish_reason), i
        assert all(o.finish_reason is None for o in outs[:-1])


def test_a_cancelled_row_leaves_and_the_others_are_unaffected(engine, tok):
    reqs = mixed(tok)
    alone = engine.generate(reqs)
    batch = engine.batch()
    batch.add(reqs, keys=list("abcde"))
    texts = {k: "" for k in "abcde"}
    batch.step()  # (each row's first text is dropped here: compare from the second step on)
    assert batch.cancel("b") and not batch.cancel("b") and len(batch) == 4
    ids: dict[str, list[int]] = {k: [] for k in "abcde"}
    while batch:
        for key, out in batch.step():
            texts[key] += out.text
            ids[key] += out.token_ids
    assert ids["b"] == []
    for key, full in zip("acde", [alone[0], alone[2], alone[3], alone[4]], strict=True):
        assert ids[key] == full.token_ids[1:]
    with pytest.raises(ValueError, match="do not fit"):
        engine.batch().add(reqs * 2, keys=list(range(10)))
    with pytest.raises(ValueError, match=r"requests\['bad'\]: max_tokens"):
        engine.batch().add([req(tok, "To", -1)], keys=["bad"])


def test_greedy_equals_transformer_generate(engine, model, tok):
    prompts = ["ROMEO:", "a", "First Citizen: Before we proceed any further, hear me speak."]
    reqs = [req(tok, p, 30, temperature=0, ignore_eos=True) for p in prompts]
    for r, c in zip(reqs, engine.generate(reqs), strict=True):
        assert c.token_ids == model.generate([r.prompt_ids], 30, temperature=0)[0]
        assert c.finish_reason == "length" and c.completion_tokens == 30
        assert c.prompt_tokens == len(r.prompt_ids)
        assert c.text == tok.decode(c.token_ids)


def test_more_requests_than_max_batch_size_in_generate(model, tok):
    small = Engine(model, tok, max_batch_size=2)
    reqs = mixed(tok)
    for a, b in zip(small.generate(reqs), Engine(model, tok).generate(reqs), strict=True):
        same(a, b)
    with pytest.raises(ValueError, match="max_batch_size 2"):
        small.stream(reqs)


# ------------------------------------------------------------------------------------ sampling


def test_seeds(engine, tok):
    def run(seed, **kw):
        return engine.generate([req(tok, "To be", 20, temperature=1.5, seed=seed, ignore_eos=True, **kw)])[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(None) != run(None)  # no seed: fresh randomness
    greedy = engine.generate([req(tok, "To be", 20, temperature=0, ignore_eos=True)])[0].token_ids
    assert run(3, top_k=1) == greedy
    assert run(3, top_p=1e-6) == greedy  # a nucleus of one token


@pytest.mark.parametrize("kw", [{}, {"top_k": 5}, {"top_p": 0.8}, {"top_k": 7, "top_p": 0.9}])
def test_the_model_and_the_engine_sample_alike(engine, model, tok, kw):
    """One sampler (lm.sampling): a seeded Transformer.generate of one prompt draws the engine's tokens."""
    prompt = tok.encode("To be")
    done = engine.generate([GenRequest(prompt, 20, temperature=1.5, seed=4, ignore_eos=True, **kw)])[0]
    assert model.generate([prompt], 20, temperature=1.5, seed=4, **kw)[0] == done.token_ids


def test_sample_rows_per_row_settings():
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log().repeat(6, 1)
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0])
    top_k = torch.tensor([3, 3, 3, 2, 3, 3])
    top_p = torch.tensor([2.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    u = torch.tensor([0.1, 0.6, 0.9, 0.9, 0.9, 0.9])
    # inverse CDF on 0.5 / 0.3 / 0.2; top-2 renormalises to 0.625 / 0.375; top_p 0.5 keeps only the first;
    # temperature 0 is the argmax whatever its number
    assert sample_rows(logits, temperature, top_k, top_p, u).tolist() == [0, 1, 2, 1, 0, 0]
    counts = torch.bincount(sample_rows(logits[:1].repeat(20000, 1), torch.ones(20000), torch.full((20000,), 3),
                                        torch.full((20000,), 2.0), torch.rand(20000)), minlength=3)
    assert (counts / 20000).tolist() == pytest.approx(probs.tolist(), abs=0.02)


# ------------------------------------------------------------------------- stops, eos, length


def test_stop_string_cuts_exactly(engine, tok):
    free = engine.generate([req(tok, "ROMEO:", 40, temperature=0, ignore_eos=True)])[0]
    stop = next(s for s in (free.text[i : i + 3] for i in range(4, len(free.text) - 3))
                if s.isascii() and s.isprintable() and s.strip())
    cut = free.text.find(stop)
    out = engine.generate([req(tok, "ROMEO:", 40, temperature=0, ignore_eos=True, stop=["zzzz", stop])])[0]
    assert out.finish_reason == "stop"
    assert out.text == free.text[:cut] and stop not in out.text
    assert out.token_ids == free.token_ids[: len(out.token_ids)] and len(out.token_ids) < 40
    assert stop in tok.decode(out.token_ids)  # the token completing the stop string is kept, its text is not
    assert stop not in tok.decode(out.token_ids[:-1])


def test_eos_finishes_with_stop_and_is_not_returned(engine, model, tok):
    prompt = tok.encode("ROMEO:")
    greedy = model.generate([prompt], 15, temperature=0)[0]
    k = next(k for k in range(1, 15) if greedy[k] not in greedy[:k])
    fake = copy.copy(tok)
    fake.eos_id = greedy[k]
    eng = Engine(model, fake)
    out = eng.generate([GenRequest(prompt, 15, temperature=0, logprobs=True)])[0]
    assert (out.token_ids, out.finish_reason, out.completion_tokens) == (greedy[:k], "stop", k)
    assert len(out.logprobs) == k and out.text == tok.decode(greedy[:k])
    kept = eng.generate([GenRequest(prompt, 15, temperature=0, ignore_eos=True)])[0]
    assert (kept.token_ids, kept.finish_reason) == (greedy, "length")


def test_logprobs_match_a_full_forward(engine, model, tok):
    r = req(tok, "First Citizen:", 20, temperature=0, logprobs=True, ignore_eos=True)
    out = engine.generate([r])[0]
    ids = torch.tensor([r.prompt_ids + out.token_ids])
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    n = len(r.prompt_ids)
    expected = torch.log_softmax(logits[0, n - 1 :], -1).gather(1, ids[0, n:, None]).squeeze(1)
    assert len(out.logprobs) == 20 and all(lp <= 0 for lp in out.logprobs)
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    assert engine.generate([req(tok, "x", 3, temperature=0)])[0].logprobs is None


def test_prompt_logprobs_match_a_full_forward_in_a_padded_batch(engine, model, tok):
    """Echo (lm-eval's log-likelihood requests): each prompt token's logprob given the ones before it, its
    top alternatives, the first None; max_tokens 0 stops after the prefill, 1 also samples one token."""
    prompts = ["First Citizen:\nBefore we proceed any further, hear me speak.", "MENENIUS:\nWhy", "To be"]
    reqs = [req(tok, p, m, temperature=0, logprobs=True, top_logprobs=3, prompt_logprobs=True, ignore_eos=True)
            for p, m in zip(prompts, [0, 1, 0], strict=True)]
    plain = req(tok, "KING:", 4, temperature=0, ignore_eos=True)  # a batch-mate without echo
    outs = engine.generate([*reqs, plain])
    for r, out in zip(reqs, outs[:3], strict=True):
        ids = torch.tensor([r.prompt_ids])
        with torch.no_grad():
            logits, _ = model(ids)
        logp = torch.log_softmax(logits[0, :-1], -1)  # [n - 1, V]: position t predicts token t + 1
        expected = logp.gather(1, ids[0, 1:, None]).squeeze(1).tolist()
        assert out.prompt_logprobs[0] is None and out.prompt_top_logprobs[0] is None
        assert out.prompt_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        best = logp.topk(3, -1)
        for t, top in enumerate(out.prompt_top_logprobs[1:]):
            assert [i for i, _ in top] == best.indices[t].tolist()
            assert [lp for _, lp in top] == pytest.approx(best.values[t].tolist(), abs=1e-4)
        assert len(out.token_ids) == r.max_tokens and out.finish_reason == "length"
    assert outs[1].token_ids == engine.generate([req(tok, prompts[1], 1, temperature=0, ignore_eos=True)])[0].token_ids
    assert outs[3].prompt_logprobs is None and len(outs[3].token_ids) == 4



def test_adjust_logits_applies_openai_penalties_and_bias_per_row():
    logits = torch.zeros(3, 6)
    out = adjust_logits(logits, [[1, 1, 2], [1, 1, 2], []], [0.5, 0.0, 0.0], [0.25, 0.0, 0.0],
                        [None, {4: 100.0, 0: -7.5}, None])
    assert out[0].tolist() == [0.0, -0.5 - 0.5, -0.5 - 0.25, 0.0, 0.0, 0.0]  # presence·(count>0) + frequency·count
    assert out[1].tolist() == [-7.5, 0.0, 0.0, 0.0, 100.0, 0.0]  # bias only: its row has no penalties
    assert out[2].tolist() == [0.0] * 6 and logits.eq(0).all()  # a copy: the input is untouched


def test_top_logprobs_are_the_likeliest_sorted_with_the_chosen_logprob():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    chosen, tops = top_logprobs(logits, torch.tensor([2, 0]), 3)
    logp = torch.log_softmax(logits, -1)
    assert chosen == pytest.approx([logp[0, 2].item(), logp[1, 0].item()])
    assert ([i for i, _ in tops[0]] == [1, 3, 2]
            and [lp for _, lp in tops[0]] == pytest.approx(logp[0, [1, 3, 2]].tolist()))
    assert tops[1][0] == (0, pytest.approx(chosen[1])) and top_logprobs(logits, torch.tensor([0, 0]), 0)[1] == [[], []]


def test_logit_bias_and_penalties_steer_greedy_rows_alone(engine, tok):
    plain = req(tok, "Speak", 40, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    forced = dataclasses.replace(plain, logit_bias={7: 100.0})
    banned = dataclasses.replace(plain, logit_bias={engine.generate([plain])[0].token_ids[0]: -100.0})
    penalized = dataclasses.replace(plain, frequency_penalty=2.0, presence_penalty=0.5)
    rewarded = dataclasses.replace(plain, frequency_penalty=-2.0)
    base, f, b, p, r = engine.generate([plain, forced, banned, penalized, rewarded])
    assert f.token_ids == [7] * 40 and b.token_ids[0] != base.token_ids[0]

    def repeats(out) -> int:
        return max(out.token_ids.count(t) for t in out.token_ids)

    assert repeats(p) < repeats(base) < repeats(r)  # this greedy answer repeats a token (4 times)
    assert same(engine.generate([plain])[0], base) is None  # the adjusted rows left the plain one alone
    for lp, top, token in zip(base.logprobs, base.top_logprobs, base.token_ids, strict=True):
        assert len(top) == 3 and top[0] == (token, pytest.approx(lp, abs=1e-5))  # greedy: the chosen is the top
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert len(f.top_logprobs) == 40  # logprobs are the model's own: before the bias


# --------------------------------------------------------------------------------- streaming


def test_stream_steps_are_aligned_and_add_up(engine, tok):
    reqs = mixed(tok)
    final = engine.generate(reqs)
    steps = list(engine.stream(reqs))
    assert all(len(s) == len(reqs) for s in steps)
    assert len(steps) == max(c.completion_tokens + (c.finish_reason == "stop") for c in final)
    for i, c in enumerate(final):
        outs = [s[i] for s in steps]
        n = next(j for j, o in enumerate(outs) if o.finish_reason)  # the last StepOutput of row i
        assert all(o is not None and o.finish_reason is None for o in outs[:n])
        assert all(o is None for o in outs[n + 1 :])
        assert "".join(o.text for o in outs[: n + 1]) == c.text
        assert [t for o in outs[: n + 1] for t in o.token_ids] == c.token_ids
        assert outs[n].finish_reason == c.finish_reason
    assert list(engine.stream([])) == [] and engine.generate([]) == []


def byte_tokens(tok, text: str) -> list[int]:
    """One token per UTF-8 byte (byte-level BPE's alphabet), so characters arrive in pieces."""
    (pieces, _), = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    return [tok.tokenizer.token_to_id(ch) for ch in pieces]


def feed(tok, ids: list[int], stop: list[str]) -> tuple[list[str], str, bool]:
    row, chunks, stopped = RowText(tok, stop), [], False
    for t in ids:
        chunk, stopped = row.add(t)
        chunks.append(chunk)
        if stopped:
            break
    if not stopped:
        rest, stopped = row.finish()
        chunks.append(rest)
    return chunks, row.text, stopped


def test_incremental_text_never_splits_characters(tok):
    text = "héllo → 世界 😀 done"
    ids = byte_tokens(tok, text)
    assert len(ids) == len(text.encode())
    chunks, final, stopped = feed(tok, ids, [])
    assert "".join(chunks) == final == text and not stopped
    assert not any("\ufffd" in c for c in chunks)
    assert sum(1 for c in chunks if c) < len(ids)  # held back inside multi-byte characters
    chunks, final, _ = feed(tok, byte_tokens(tok, "ab") + byte_tokens(tok, "世")[:2], [])
    assert "".join(chunks) == final == "ab\ufffd"  # a partial character at the end is flushed as U+FFFD


def test_stop_string_text_is_held_back_then_cut(tok):
    stop = ["\n\nUser:"]
    chunks, final, stopped = feed(tok, byte_tokens(tok, "Hi there.\n\nUs\n\nUser: more"), stop)
    assert stopped and final == "Hi there.\n\nUs" == "".join(chunks)
    released = ""
    for c in chunks:
        released += c
        assert not released.endswith(("\n", "\n\nU", "\n\nUs\n\nUser"))  # a possible stop start is never released early
    # a false start is released once it cannot be a stop string any more, and everything at the end
    chunks, final, stopped = feed(tok, byte_tokens(tok, "a\n\nUsa\n\nU"), stop)
    assert not stopped and "".join(chunks) == final == "a\n\nUsa\n\nU" and chunks[-1] == "\n\nU"
    # the earliest of several stop strings wins, even in one token
    chunks, final, stopped = feed(tok, tok.encode("the king and the queen"), ["queen", "king", "and"])
    assert stopped and "".join(chunks) == final == "the "


class BytesTokenizer:
    """Token i = PIECES[i] (any bytes); decode is lossy UTF-8 like byte-level BPE's."""

    PIECES = (b"xa", b"b\xe4", b"\xb8\x96", b"!")

    def decode(self, ids) -> str:
        return b"".join(self.PIECES[i] for i in ids).decode("utf-8", errors="replace")


def test_stop_string_found_in_the_token_that_completes_it():
    """'b' arrives together with the first byte of 世: the stop string 'ab' is complete at that token."""
    row = RowText(BytesTokenizer(), ["ab"])
    assert row.add(0) == ("x", False)  # "a" could start the stop string: held back
    assert row.add(1) == ("", True)
    assert row.text == "x"
    row = RowText(BytesTokenizer(), ["!"])
    assert [row.add(i) for i in range(4)] == [("xa", False), ("b", False), ("世", False), ("", True)]


# ------------------------------------------------------------------------------ checks, threads


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"prompt_ids": []}, r"requests\[0\]: the prompt is empty"),
        ({"prompt_ids": [1] * 60, "max_tokens": 5},
         "60 tokens \\+ max_tokens 5 = 65 exceeds the model's context length 64"),
        ({"prompt_ids": [10_000]}, "vocab_size"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logit_bias": {10_000: 1.0}}, "logit_bias names token ids outside"),
        ({"logit_bias": {3: 101.0}}, "logit_bias values"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_requests_fail_before_any_work(engine, kw, match):
    bad = GenRequest(**{"prompt_ids": [1, 2], "max_tokens": 4, **kw})
    with pytest.raises(ValueError, match=match):
        engine.stream([bad])  # raised by the call itself, not at the first step
    with pytest.raises(ValueError, match=match):
        engine.generate([bad])
    with pytest.raises(ValueError, match=match.replace(r"requests\[0\]", "request")):
        engine.check(bad)
    assert engine.context_length() == CTX


def test_stream_advanced_from_other_threads(engine, tok):
    """One step per thread (asyncio.to_thread style): same output, inference mode never leaks."""
    reqs = mixed(tok)
    expected = list(engine.stream(reqs))
    it, got = engine.stream(reqs), []

    def step():
        got.append(next(it, None))

    while True:
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
        if got[-1] is None:
            break
    assert len(got) - 1 == len(expected)
    for a_step, b_step in zip(got, expected, strict=False):
        for a, b in zip(a_step, b_step, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                assert (a.text, a.token_ids, a.finish_reason) == (b.text, b.token_ids, b.finish_reason)
    assert not torch.is_inference_mode_enabled()


def test_batch_scheduler_admits_arrivals_into_the_running_batch(engine, tok):
    """lm.serve.scheduler.BatchScheduler (no Ray): a lone request starts decoding alone; the 6 that
    arrive meanwhile join it (8 rows); a caller that leaves early frees its row; each request gets
    exactly what the engine gives it alone, step by step or (``whole``) in one output at the end."""
    import asyncio
    import contextlib

    from lm.serve.scheduler import BatchScheduler

    sizes: list[int] = []
    prompts = [f"LORD {i}:" for i in range(7)]

    async def collect(outputs, limit=None):
        outs = []
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                outs.append(out)
                if len(outs) == limit:
                    break
        return "".join(o.text for o in outs), outs[-1].finish_reason, len(outs)

    async def scenario():
        scheduler = BatchScheduler(max_batch_size=8, observe_batch=sizes.append)
        first = asyncio.create_task(collect(scheduler.outputs(req(tok, prompts[0], 24, temperature=0,
                                                                  ignore_eos=True), engine)))
        while not sizes:
            await asyncio.sleep(0)  # the first step starts with the one request
        rest = [collect(scheduler.outputs(req(tok, p, 24, temperature=0, ignore_eos=True), engine, whole=i % 2 == 1))
                for i, p in enumerate(prompts[1:], start=1)]
        leaver = collect(scheduler.outputs(req(tok, "KING:", 24, temperature=0, ignore_eos=True), engine), limit=2)
        results = await asyncio.gather(first, *rest, leaver)
        for _ in range(50):
            if not scheduler.queues and scheduler.inbox.empty():
                break
            await asyncio.sleep(0.01)
        return results, scheduler

    results, scheduler = asyncio.run(scenario())
    scheduler.close()
    # the others joined while the first decoded (all at one step, or over a few: the thread does not wait)
    assert sizes[0] == 1 and sizes[-1] == 8 and sizes == sorted(sizes) and not scheduler.queues
    alone = engine.generate([req(tok, p, 24, temperature=0, ignore_eos=True) for p in prompts])
    assert [text for text, _, _ in results[:7]] == [c.text for c in alone]
    assert all(reason == "length" for _, reason, _ in results[:7])
    assert [n for _, _, n in results[:7]] == [24, 1, 24, 1, 24, 1, 24]  # whole: one output
    assert results[7][1] is None  # the leaver read 2 steps and left


def test_batch_scheduler_holds_a_lone_arrival_back_for_join_max_wait_steps(engine, tok):
    """join_ratio 0.5: one request arriving at a batch of 4 rows is held back (a prefill for one is not
    worth a step yet) until join_max_wait_steps=10 steps have passed; then it joins and gets its
    answer, the same as alone."""
    import asyncio

    from lm.serve.scheduler import BatchScheduler

    order: list[str] = []
    sizes: list[int] = []

    async def collect(outputs):
        return "".join([out.text async for out in outputs])

    async def tagged(name, outputs):
        async for out in outputs:
            order.append(name)
            yield out

    async def scenario():
        scheduler = BatchScheduler(max_batch_size=8, observe_batch=sizes.append, join_ratio=0.5, join_max_wait_steps=10)
        running = [asyncio.create_task(collect(tagged(f"r{i}", scheduler.outputs(
            req(tok, f"LORD {i}:", 40, temperature=0, ignore_eos=True), engine)))) for i in range(4)]
        while sum(sizes) < 4 or "r0" not in order:
            await asyncio.sleep(0)
        order.append("submitted")
        late = await collect(tagged("late", scheduler.outputs(
            req(tok, "KING:", 3, temperature=0, ignore_eos=True), engine)))
        await asyncio.gather(*running)
        scheduler.close()
        return late

    late = asyncio.run(scenario())
    after = order[order.index("submitted"):]
    assert after[: after.index("late")].count("r0") >= 9  # held back ~10 steps (without: joins at the next)
    assert late == engine.generate([req(tok, "KING:", 3, temperature=0, ignore_eos=True)])[0].text


def test_process_scheduler_decodes_in_a_child_process_like_the_engine(model, tok, tmp_path):
    """lm.serve.engine_process: the same decode loop in a spawned process, fed through queues; every
    request gets what the engine in this process gives it; a load error reaches the caller; a second
    model loads beside the first."""
    import asyncio

    from lm.config import GenerateConfig, StorageConfig
    from lm.modeldir import save_model_dir
    from lm.serve.engine_process import ProcessScheduler
    from lm.storage import ObjectStore, StorageError

    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    uri = str(tmp_path / "model")
    save_model_dir(store, uri, model, tok, GenerateConfig(), {"run": "process-test"})
    scheduler = ProcessScheduler(store.cfg, None, 1, max_batch_size=4, join_ratio=0.5, join_max_wait_steps=2)
    try:
        engine = scheduler.load(uri)
        assert engine.context_length() == CTX and engine.tokenizer.encode("To") == tok.encode("To")
        reqs = [req(tok, p, 12, temperature=0, ignore_eos=True) for p in ("ROMEO:", "To be", "KING", "Speak on")]
        reqs += [req(tok, "LORD:", 10, temperature=0.9, seed=3)]

        async def one(r, whole):
            return "".join([o.text async for o in scheduler.outputs(r, engine, whole=whole)])

        async def run_all():
            return await asyncio.gather(*(one(r, i % 2 == 0) for i, r in enumerate(reqs)))

        texts = asyncio.run(run_all())
        assert texts == [c.text for c in Engine(model, tok, max_batch_size=8).generate(reqs)]
        with pytest.raises(StorageError, match="no published model directory"):
            scheduler.load(str(tmp_path / "missing"))
        second = scheduler.load(uri)
        assert second.ref != engine.ref
        scheduler.unload(engine)
        assert asyncio.run(_text(scheduler.outputs(reqs[0], second))) == texts[0]
    finally:
        scheduler.close()
    assert not scheduler._process.is_alive()


def test_batch_scheduler_refuses_a_bad_request_alone(engine, tok):
    """A request the engine refuses when it joins (here: token ids outside the vocabulary) raises in
    its own caller, streamed or whole; the rows already decoding finish as if it never came."""
    import asyncio

    from lm.serve.scheduler import BatchScheduler

    good = req(tok, "ROMEO:", 16, temperature=0, ignore_eos=True)
    bad = GenRequest([tok.vocab_size + 5], 4)

    async def scenario():
        scheduler = BatchScheduler(max_batch_size=8)
        running = asyncio.create_task(_text(scheduler.outputs(good, engine)))
        await asyncio.sleep(0.01)
        outcomes = []
        for whole in (False, True):
            try:
                await _text(scheduler.outputs(bad, engine, whole=whole))
                outcomes.append("answered")
            except ValueError as err:
                outcomes.append(str(err))
        text = await running
        scheduler.close()
        return outcomes, text

    outcomes, text = asyncio.run(scenario())
    assert all("outside [0, vocab_size" in o for o in outcomes), outcomes
    assert text == engine.generate([good])[0].text


async def _text(outputs) -> str:
    return "".join([o.text async for o in outputs])
