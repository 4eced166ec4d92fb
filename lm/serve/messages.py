"""The decode loop's messages (lm.serve.scheduler, lm.serve.engine_process), typed: small frozen
dataclasses, matched by type, picklable (the engine process's queues carry them between processes).

Into the decode loop's inbox: :class:`Add` (a request joins), :class:`Cancel` (its caller left),
:class:`Stop`; and, for the engine process only, :class:`Load` and :class:`Unload` (a model by its
reference number). Out of the engine process: :class:`Out` (one step's outputs), :class:`Loaded` (a
load's result or error) and :class:`Stopped`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Add:
    """A request joins the batch: ``engine`` names its engine (the Engine, or the engine process's ref);
    ``whole``: one output once it has finished instead of one per step."""
    key: int
    request: Any
    engine: Any
    whole: bool = False


@dataclass(frozen=True)
class Cancel:
    key: int


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Load:
    ref: int
    uri: str


@dataclass(frozen=True)
class Unload:
    ref: int


@dataclass(frozen=True)
class Out:
    """One step's (key, StepOutput | Exception) pairs; ``joined``: rows decoding together if requests joined."""
    outputs: list
    joined: int


@dataclass(frozen=True)
class Loaded:
    """A :class:`Load`'s answer: ``result`` (tokenizer JSON, model config dict) or the ``error`` it raised."""
    ref: int
    result: tuple[str, dict] | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Stopped:
    pass


Inbox = Add | Cancel | Stop | Load | Unload
Outbox = Out | Loaded | Stopped
