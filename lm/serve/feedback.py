"""Feedback capture: completions and /v1/feedback records appended in batches as JSONL objects under a
storage prefix, the continual-learning input (lm.continual reads them); and the response records, metadata
only, that Serve writes for every response whether capture is on or off (``{type, id, model_version,
model_uri, time}`` under ``<storage.root>/responses``; ``lm lineage <response id>`` starts there).

Both are a :class:`JsonlBatches`: records go to an in-memory buffer (``add`` never touches storage); a
background task writes a batch every ``flush_interval_s`` or as soon as ``flush_records`` are waiting, in a
worker thread, so a slow or failing store never delays a response. Each batch is one object,
``<prefix>/<YYYY-MM-DD>/<writer>-<unix ms>-<seq>.jsonl``; a failed write keeps the records for the next try.

Privacy: ``add`` redacts every text of a record (prompts, completions, corrections: every string but the
record's type, id and model version) before it is buffered (lm.data.pii): secrets always (API keys of common
forms and the server's own keys, bearer tokens, private-key blocks, passwords in URLs and assignments), and
the PII kinds of ``serve.feedback.redact`` (default: e-mail addresses, card numbers, IP addresses, phone
numbers). A record that had something redacted says what, per kind (``"redacted": {"email": 1}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lm.config import join_uri
from lm.data.pii import redact
from lm.storage import ObjectStore

KEEP = frozenset({"type", "id", "model_version"})  # a record's fields that are never redacted (server-made)

log = logging.getLogger(__name__)


def _redacted(value: Any, kinds: Sequence[str], known: frozenset[str], counts: Counter) -> Any:
    if isinstance(value, str):
        text, found = redact(value, kinds, known)
        counts.update(found)
        return text
    if isinstance(value, list):
        return [_redacted(v, kinds, known, counts) for v in value]
    if isinstance(value, dict):
        return {k: _redacted(v, kinds, known, counts) for k, v in value.items()}
    return value


def redact_record(record: dict, kinds: Sequence[str] = ("secret",), known_digests: Iterable[str] = ()) -> dict:
    """``record`` with every string (nested in lists and dicts too) but those of :data:`KEEP` redacted for
    ``kinds`` (lm.data.pii; ``secret`` is always among them) and ``known_digests`` (SHA-256 of the server's
    keys); with ``"redacted": {kind: count}`` when something was."""
    kinds = ("secret", *(k for k in kinds if k != "secret"))
    counts: Counter = Counter()
    known = frozenset(known_digests)
    out = {k: v if k in KEEP else _redacted(v, kinds, known, counts) for k, v in record.items()}
    if counts:
        out["redacted"] = dict(sorted(counts.items()))
    return out


class JsonlBatches:
    """Records buffered in memory and written in batches, one JSONL object per batch (see the module docstring)."""

    def __init__(self, store: ObjectStore, prefix: str, *, flush_interval_s: float = 5.0, flush_records: int = 256,
                 writer: str | None = None):
        self.store, self.prefix = store, prefix
        self.flush_interval_s, self.flush_records = flush_interval_s, flush_records
        self.writer = writer or uuid.uuid4().hex[:8]
        self._buffer: list[dict] = []
        self._lock = threading.Lock()
        self._seq = 0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self.written = 0  # records written so far

    def add(self, record: dict) -> None:
        """Queue one record (called from a request handler: returns at once)."""
        with self._lock:
            self._buffer.append({"time": time.time(), **record})
            full = len(self._buffer) >= self.flush_records
        self._ensure_task()
        if full and self._wake is not None:
            self._wake.set()

    def _ensure_task(self) -> None:
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no event loop (plain code): flush() by hand
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.flush_interval_s)
            self._wake.clear()
            await asyncio.to_thread(self.flush)

    def flush(self) -> str | None:
        """Write what is buffered as one object; returns its URI (None if nothing was waiting)."""
        with self._lock:
            batch, self._buffer = self._buffer, []
            self._seq += 1
            seq = self._seq
        if not batch:
            return None
        uri = join_uri(self.prefix, time.strftime("%Y-%m-%d", time.gmtime()),
                       f"{self.writer}-{int(time.time() * 1000)}-{seq:06d}.jsonl")
        try:
            # ASCII JSON: no raw U+2028 or \x85 in a line, where str.splitlines() would cut a record
            self.store.write_text(uri, "".join(json.dumps(r) + "\n" for r in batch))
        except Exception as err:  # keep the records; the next flush retries
            log.warning("feedback: writing %d records to %s failed: %s", len(batch), uri, err)
            with self._lock:
                self._buffer[:0] = batch
            return None
        self.written += len(batch)
        return uri


class FeedbackLog(JsonlBatches):
    """Feedback capture: every record redacted before it is buffered."""

    def __init__(self, store: ObjectStore, prefix: str, *, redact: Sequence[str] = ("email", "card", "ip", "phone"),
                 known_digests: Iterable[str] = (), **batching: Any):
        """``redact``: the PII kinds removed from every record before it is buffered (secrets always are);
        ``known_digests``: SHA-256 digests of the server's API keys, redacted whatever their form; ``batching``:
        :class:`JsonlBatches`'s settings."""
        super().__init__(store, prefix, **batching)
        self.redact, self.known_digests = tuple(redact), frozenset(known_digests)

    def add(self, record: dict) -> None:
        """Queue one record, redacted (called from a request handler: returns at once)."""
        super().add(redact_record(record, self.redact, self.known_digests))
