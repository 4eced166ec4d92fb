"""Continuous batching on one engine (no Ray): :class:`BatchScheduler` runs a decode thread over one
:class:`~lm.serve.engine.DecodeBatch` that requests join and leave between steps; :func:`decode_loop` is
that loop (shared with the engine process, lm.serve.engine_process), fed typed messages (lm.serve.messages),
its state between steps in :class:`_LoopState`; :func:`merge_streams` interleaves the chunks of several
requests (the ingress's n > 1 and multi-prompt streams). Used by lm.serve.model_server and app.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from lm.serve.messages import Add, Cancel, Stop


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
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # lm.serve.messages: Add | Cancel | Stop
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
        self.inbox.put(Add(key, request, self._engine_token(engine), whole))
        try:
            while (out := await outputs.get()) is not None:
                if isinstance(out, Exception):
                    raise out
                yield out
        finally:
            if self.queues.pop(key, None) is not None:  # left early (client gone, call cancelled): free its row
                self.inbox.put(Cancel(key))

    def _engine_token(self, engine):
        """How the decode loop's inbox names an engine (the engine itself, in this process)."""
        return engine

    def close(self) -> None:
        """Stop the decode thread (rows still running are dropped)."""
        if self._thread is not None:
            self.inbox.put(Stop())
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
                engine_of: Callable[[Any], Any], on_message: Callable[[Any], None] = lambda m: None) -> None:
    """The continuous-batching loop (see BatchScheduler), wherever it runs: ``get`` blocks for the next
    inbox message (lm.serve.messages; None: nothing yet, look again), ``empty`` says whether more are
    queued, ``publish`` hands a step's outputs on, ``engine_of`` turns an Add's engine field into an
    Engine, and ``on_message`` takes any message other than Add / Cancel / Stop."""
    state = _LoopState(settings, engine_of, on_message)
    while True:
        messages = [] if state.batch or state.waiting else [get()]  # idle: sleep until a request comes
        while not empty():
            messages.append(get())
        for message in messages:
            if isinstance(message, Stop):
                return
            state.take(message)
        if not state.ready():
            continue
        outputs, joined = state.step()
        if outputs or joined:
            publish(outputs, joined)


class _Waiting(NamedTuple):
    key: int
    request: Any
    engine: Any


class _LoopState:
    """What the decode loop holds between steps: the running batch, the requests waiting to join it (with
    the steps they have been held back), and what each ``whole`` request has produced so far."""

    def __init__(self, settings: dict, engine_of: Callable[[Any], Any], on_message: Callable[[Any], None]):
        self.max_batch_size, self.wait_s = settings["max_batch_size"], settings["wait_s"]
        self.join_ratio, self.join_max_wait_steps = settings["join_ratio"], settings["join_max_wait_steps"]
        self.engine_of, self.on_message = engine_of, on_message
        self.batch: Any = None
        self.waiting: list[_Waiting] = []
        self.waited = False  # an idle engine has waited wait_s for a burst
        self.held = 0  # steps the waiting requests have been held back
        self.partial: dict[int, Any] = {}  # key -> what a `whole` request has produced so far

    def take(self, message: Any) -> None:
        match message:
            case None:
                pass
            case Add(key=key, request=request, engine=engine, whole=whole):
                self.waiting.append(_Waiting(key, request, self.engine_of(engine)))
                if whole:
                    self.partial[key] = None
            case Cancel(key=key):
                self.waiting = [w for w in self.waiting if w.key != key]
                self.partial.pop(key, None)
                if self.batch:
                    self.batch.cancel(key)
            case _:
                self.on_message(message)

    def ready(self) -> bool:
        """Whether to step now: a batch is running, or one starts (an idle engine may wait for a burst)."""
        if self.batch:
            return True
        if not self.waiting:
            return False
        if self.wait_s and not self.waited and len(self.waiting) < self.max_batch_size:
            time.sleep(self.wait_s)  # an idle engine: let a burst arrive together
            self.waited = True
            return False
        self.batch, self.waited = self.waiting[0].engine.batch(), False
        return True

    def joining(self) -> list[_Waiting]:
        """The waiting requests that join at this step (none while too few to be worth a prefill)."""
        batch = self.batch
        joining = [w for w in self.waiting if w.engine is batch.engine][: batch.room()]
        if joining and batch and len(joining) < self.join_ratio * len(batch) and self.held < self.join_max_wait_steps:
            joining, self.held = [], self.held + 1  # decode on
        else:
            self.held = 0
        taken = {w.key for w in joining}
        self.waiting = [w for w in self.waiting if w.key not in taken]
        return joining

    def step(self) -> tuple[list, int]:
        """One decode step with the joining rows: the (key, StepOutput | Exception) pairs to publish, and
        the rows decoding together if requests joined (0 if none)."""
        joining, outputs = self.joining(), []
        try:
            self.batch.add([w.request for w in joining], [w.key for w in joining])
        except Exception as err:  # refused requests hear why; the batch runs on
            outputs, joining = [(w.key, err) for w in joining], []
        joined = len(self.batch) if joining else 0
        try:
            outputs += self.batch.step()
        except Exception as err:  # the engine failed: every row of the batch hears it
            outputs += [(row.key, err) for row in self.batch.rows]
            self.batch = None
        if self.partial:
            outputs = _gather_whole(outputs, self.partial)
        return outputs, joined


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
                                 out.finish_reason,
                                 (None if so_far.top_logprobs is None
                                  else so_far.top_logprobs + (out.top_logprobs or [])),
                                 so_far.prompt_logprobs, so_far.prompt_top_logprobs)  # only the first step's
            if out.finish_reason is None:
                partial[key] = out
            else:
                del partial[key]
                released.append((key, out))
    return released


async def merge_streams(streams) -> AsyncIterator[tuple[int, Any]]:
    """Chunks of several streams as they come, tagged with the stream's index."""
    arrivals: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for chunk in stream:
                await arrivals.put((i, chunk))
        finally:
            await arrivals.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    open_streams = len(streams)
    try:
        while open_streams:
            i, chunk = await arrivals.get()
            if chunk is None:
                open_streams -= 1
            else:
                yield i, chunk
    finally:
        for t in tasks:
            t.cancel()
