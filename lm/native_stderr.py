"""What native code writes to this process's stderr (file descriptor 2, below Python's ``sys.stderr``): Ray's
C++ core in the driver logs there directly, so no logging handler sees it. :func:`route_native_stderr` puts a
pipe in front of the terminal and a thread that reads it line by line:

- Ray's C++ lines at INFO and WARNING, and the ERROR lines of :data:`BENIGN` (Ray's note that an actor's
  constructor arguments live in the object store, ray-project/ray#57733), go to the run's log file (logger
  ``lmforge.native``), not the terminal;
- everything else (Python's warnings and tracebacks, other ERROR and FATAL lines) reaches the terminal as
  written.

At exit the terminal is put back and what the pipe still holds is handed on. A leaf: it imports nothing of
lm. lm.cli calls it for a job run from the ``lm`` command (never in a test's process: pytest owns the file
descriptors there), unless ``--verbose``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading

RAY_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[IWEF]) \d+ \d+\] \S+\.cc:\d+: ")
BENIGN = (re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),)
logger = logging.getLogger("lmforge.native")  # INFO: the log file (lm.logfile), not the terminal


def quiet(line: bytes) -> bool:
    """Whether a line of native stderr is for the log file only (see the module docstring)."""
    found = RAY_LINE.match(line)
    return bool(found) and (found["level"] in b"IW" or any(p.search(line) for p in BENIGN))


class NativeStderr:
    """File descriptor 2 through a pipe, sorted by :func:`quiet` (one per process: :func:`route_native_stderr`)."""

    def __init__(self):
        self.terminal = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        self.thread = threading.Thread(target=self._pump, name="lmforge-native-stderr", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        while chunk := os.read(self.read_end, 65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._hand_on(line + b"\n")
            if pending and not pending.startswith(b"["):  # a partial line that is no Ray log line: now
                self._hand_on(pending)
                pending = b""
        if pending:
            self._hand_on(pending)
        os.close(self.read_end)

    def _hand_on(self, data: bytes) -> None:
        if quiet(data):
            logger.info("%s", data.decode(errors="replace").rstrip())
        else:
            while data:
                data = data[os.write(self.terminal, data):]

    def restore(self, timeout_s: float = 2.0) -> None:
        """The terminal as file descriptor 2 again; the pipe's last lines handed on (at exit)."""
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr: nothing to flush
            sys.stderr.flush()
        os.dup2(self.terminal, 2)  # the pipe's last writer here closes: the thread reads to its end
        self.thread.join(timeout_s)


_routed: list[NativeStderr] = []


def route_native_stderr() -> None:
    """Sort this process's native stderr from now on (once; see the module docstring)."""
    if _routed:
        return
    _routed.append(NativeStderr())
    atexit.register(_routed[0].restore)
