"""The decode loop in a process of its own (``serve.engine_process: true``), next to the Serve replica.

In the replica's own process the decode thread shares the GIL with everything Serve does per request
(routing, serialization, logging, metrics): under load it was off the CPU ~35 % of its busy time here.
Measured on the 2-core VM (16 closed-loop clients, jobs/bench/serve.py's load): 1.10k tok/s in the
child against 1.03-1.10k in the replica's thread, so it is off by default there: with two cores the
limit is CPU shared with Serve's proxy, ingress and the client, not the GIL. It is for machines where
Serve's request handling (many streamed requests) would contend for the replica's GIL.
:class:`ProcessScheduler` keeps :class:`~lm.serve.scheduler.BatchScheduler`'s interface
(``outputs(request, engine, whole)``, ``close()``) but runs the same :func:`decode_loop` in a spawned
child: requests, cancellations and model loads go in through one multiprocessing queue, each step's
outputs come back through another (typed messages, lm.serve.messages), read by a thread that hands them
to the event loop. The child loads the weights (lm.serve.loading, as the replica does without it) and
holds them; the replica holds an :class:`EngineHandle` per loaded model (tokenizer and limits, to
tokenize and check requests) and names the engine by a number in every request. The
child exits when told to, or when its parent is gone.

    scheduler = ProcessScheduler(store_cfg, quantize=None, threads=1, max_batch_size=16)
    engine = scheduler.load("s3://b/runs/x/model")          # blocking: the child loads the weights
    async for out in scheduler.outputs(GenRequest(...), engine, whole=True): ...
    scheduler.unload(engine)                                 # after a hot reload, once swapped
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
import queue
import threading
from typing import Any

from lm.config import ModelConfig, StorageConfig
from lm.serve import grammar
from lm.serve.engine import GenRequest
from lm.serve.messages import Inbox, Load, Loaded, Out, Stop, Stopped, Unload
from lm.serve.sampling import check_request
from lm.serve.scheduler import BatchScheduler, decode_loop
from lm.tokenizer import BPETokenizer


class EngineHandle:
    """The replica's side of a model loaded in the engine process: what requests are checked against."""

    def __init__(self, ref: int, tokenizer: BPETokenizer, cfg: ModelConfig):
        self.ref, self.tokenizer, self.cfg = ref, tokenizer, cfg

    def context_length(self) -> int:
        return self.cfg.max_seq_len

    def check(self, req: GenRequest, where: str = "request") -> None:
        check_request(req, self.cfg.max_seq_len, self.cfg.vocab_size, where)
        if req.grammar is not None:
            grammar.check(req.grammar, self.tokenizer, where)


class ProcessScheduler(BatchScheduler):
    """BatchScheduler whose decode loop runs in a child process (see the module docstring)."""

    def __init__(self, store_cfg: StorageConfig, quantize: str | None, threads: int, max_batch_size: int,
                 observe_batch=lambda n: None, wait_s: float = 0.0, join_ratio: float = 0.0,
                 join_max_wait_steps: int = 0):
        super().__init__(max_batch_size, observe_batch, wait_s, join_ratio, join_max_wait_steps)
        ctx = multiprocessing.get_context("spawn")
        self.inbox = ctx.Queue()
        self._outbox = ctx.Queue()
        self._loads: dict[int, concurrent.futures.Future] = {}
        self._refs = itertools.count(1)
        self._process = ctx.Process(target=_engine_main, name="lmforge-engine", daemon=True, args=(
            store_cfg, quantize, threads, self.settings(), self.inbox, self._outbox, os.getpid()))
        self._process.start()
        # (the base class starts no decode thread of its own while _thread is set)
        self._thread = threading.Thread(target=self._read_outbox, name="lmforge-engine-outbox", daemon=True)
        self._thread.start()

    def load(self, uri: str) -> EngineHandle:
        """Load a model directory in the engine process (blocking); a StorageError etc. is raised here."""
        ref = next(self._refs)
        done = self._loads[ref] = concurrent.futures.Future()
        self.inbox.put(Load(ref, uri))
        tokenizer_json, cfg = done.result()
        return EngineHandle(ref, BPETokenizer.from_json(tokenizer_json), ModelConfig(**cfg))

    def unload(self, engine: EngineHandle) -> None:
        """Forget a model in the engine process (rows still decoding on it finish first)."""
        self.inbox.put(Unload(engine.ref))

    def _engine_token(self, engine: EngineHandle) -> int:
        return engine.ref

    def close(self) -> None:
        if self._process.is_alive():
            self.inbox.put(Stop())
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()

    def _read_outbox(self) -> None:
        while True:
            match self._outbox.get():
                case Out(outputs=outputs, joined=joined):
                    if self._loop is not None:
                        self._loop.call_soon_threadsafe(self._deliver, outputs, joined)
                case Loaded(ref=ref, result=result, error=error):
                    future = self._loads.pop(ref)
                    future.set_exception(error) if error is not None else future.set_result(result)
                case Stopped():
                    return


def _engine_main(store_cfg: StorageConfig, quantize: str | None, threads: int, settings: dict, inbox, outbox,
                 parent_pid: int) -> None:
    """The engine process: load models on request, run the decode loop, publish each step."""
    import torch

    from lm.serve.loading import load_engine
    from lm.storage import ObjectStore

    torch.set_num_threads(threads)
    store = ObjectStore(store_cfg)
    engines: dict[int, Any] = {}

    def load(message: Load) -> None:
        try:
            engine = engines[message.ref] = load_engine(store, message.uri, quantize, settings["max_batch_size"])
            result = (engine.tokenizer.to_json(), engine.model.cfg.model_dump())
            outbox.put(Loaded(message.ref, result))
        except Exception as err:  # the replica raises it
            outbox.put(Loaded(message.ref, error=err))

    def on_message(message: Inbox) -> None:
        match message:
            case Load():  # in a thread: the rows of the current model keep decoding meanwhile
                threading.Thread(target=load, args=(message,), daemon=True).start()
            case Unload(ref=ref):
                engines.pop(ref, None)

    def get() -> Inbox:
        while True:
            try:
                return inbox.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:  # the replica is gone
                    return Stop()

    decode_loop(get, inbox.empty, lambda outputs, joined: outbox.put(Out(outputs, joined)), settings,
                engine_of=engines.__getitem__, on_message=on_message)
    outbox.put(Stopped())
