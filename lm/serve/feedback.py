"""Feedback capture: completions and /v1/feedback records appended in batches as JSONL objects under a
storage prefix, the continual-learning input (lm.continual reads them).

Records go to an in-memory buffer (``add`` never touches storage); a background task writes a batch
every ``flush_interval_s`` or as soon as ``flush_records`` are waiting, in a worker thread, so a slow
or failing store never delays a response. Each batch is one object,
``<prefix>/<YYYY-MM-DD>/<writer>-<unix ms>-<seq>.jsonl``; a failed write keeps the records for the next try.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid

from lm.config import join_uri
from lm.storage import ObjectStore

log = logging.getLogger(__name__)


class FeedbackLog:
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
