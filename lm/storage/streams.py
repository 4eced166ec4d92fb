"""File-like adapters shared by both backends, and the I/O chunk size. :class:`BodyReader` exposes a botocore
``StreamingBody`` as a raw stream (read chunk by chunk, never whole); :class:`Writer` is the write-only file
that ``ObjectStore.open(uri, "wb")`` returns: it buffers into a temp file and publishes it only on a clean
close, while an error inside the ``with`` block or garbage collection discards it, so no reader ever sees
half a file."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from typing import IO, Any

MIB = 1 << 20


class BodyReader(io.RawIOBase):
    """Raw readable stream over a botocore StreamingBody (read chunk by chunk, never whole)."""

    def __init__(self, body: Any) -> None:
        super().__init__()
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self._body.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class Writer(io.RawIOBase):
    """Write-only file: ``commit`` runs on a clean close; an error in the ``with`` block or GC discards."""

    def __init__(
            self, tmp: IO[bytes], commit: Callable[[IO[bytes]], None], discard: Callable[[], None]) -> None:
        super().__init__()
        self._tmp, self._commit, self._discard = tmp, commit, discard

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return self._tmp.write(data)

    def _finish(self, commit: bool) -> None:
        if not self.closed:
            try:
                self._commit(self._tmp) if commit else self._discard()
            finally:
                self._tmp.close()
                super().close()

    def close(self) -> None:
        self._finish(commit=True)

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._finish(commit=exc_type is None)

    def __del__(self) -> None:  # an abandoned writer never publishes half a file
        with contextlib.suppress(Exception):
            self._finish(commit=False)
