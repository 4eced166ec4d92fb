"""Progress output shared by every job: :data:`Log`, the callback a job reports its progress lines to
(``print`` by default; tests pass a no-op or a list's ``append``), and the one live progress line of this
process (:func:`display`). A leaf: it imports nothing of lm.

A Ray Train rank-0 worker prints each training record as one line, its words then a tag and JSON
(:func:`progress_message`); the driver (lm.driver_output) hands those to :func:`display`, which draws them
as one bar on a terminal (steps, loss, validation bits/byte, tokens/s, ETA; every trial of a sweep in the
same bar) or, when stdout is no terminal (CI, logs), prints a plain line at most every
``LMFORGE_PROGRESS_INTERVAL_S`` seconds (15 by default), each run's first and last record always.

A pipeline's steps (lm.data's stages) go to :func:`stage`: on a terminal one status line, each step replacing
the one before and gone when the pipeline ends (:func:`end_stages`); otherwise a pipeline's first step and then
at most one step per interval print. The log file (logger ``lmforge.progress``) gets every step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, TextIO

Log = Callable[[str], None]

TAG = "lmforge-progress "  # a worker's progress record, as JSON after the tag
FILE_TAG = "lmforge-log "  # a worker's line for the run's log file only (lm.driver_output), after the tag
FIELDS = ("step", "loss", "val_loss", "val_bpb", "tokens_per_s")
INTERVAL_VAR = "LMFORGE_PROGRESS_INTERVAL_S"
logger = logging.getLogger("lmforge.progress")  # every step of a pipeline → the run's log file (lm.logfile)


def progress_message(run: str, record: dict[str, Any], max_steps: int, line: str = "") -> str:
    """The line a worker prints for one training record: ``line`` (the record in words, what its Ray log file
    shows), then the tag and, as JSON, the run, step count and the numbers the bar shows."""
    fields = {k: record[k] for k in FIELDS if k in record}
    words = f"{line}  " if line else ""
    return words + TAG + json.dumps({"run": run, "max_steps": max_steps, **fields})


def log_file_line(line: str) -> None:
    """Print ``line`` from a Ray worker for the driver's log file, not its terminal (a sweep's trials' own
    start and end lines: the sweep's table says what matters)."""
    print(FILE_TAG + line, flush=True)


def parse_progress(line: str) -> dict[str, Any] | None:
    """The record of a :func:`progress_message` line, its words as ``line`` (None: not one)."""
    at = line.find(TAG)
    if at < 0:
        return None
    try:
        update = json.loads(line[at + len(TAG):])
    except ValueError:
        return None
    if not (isinstance(update, dict) and {"run", "step", "max_steps"} <= update.keys()):
        return None
    return {**update, "line": line[:at].rstrip()} if line[:at].strip() else update


def numbers(update: dict[str, Any]) -> str:
    """``loss 5.2159 · val 3.973 bpb · 23,795 tok/s``: what a record says besides its step."""
    parts = [f"loss {update['loss']:.4f}"] if "loss" in update else []
    if "val_bpb" in update:
        parts.append(f"val {update['val_bpb']:.3f} bpb")
    elif "val_loss" in update:
        parts.append(f"val {update['val_loss']:.4f}")
    if "tokens_per_s" in update:
        parts.append(f"{update['tokens_per_s']:,.0f} tok/s")
    return " · ".join(parts)


def trials(updates: list[dict[str, Any]]) -> str:
    """Several runs (a sweep's trials) in one bar's words: each one's step, loss and validation bits/byte,
    then their tokens/s together."""
    parts = [f"{u['step']}/{u['max_steps']} loss {u['loss']:.3f}"
             + (f" val {u['val_bpb']:.3f}" if "val_bpb" in u else "") for u in updates if "loss" in u]
    rate = sum(u.get("tokens_per_s", 0.0) for u in updates)
    return " | ".join(parts) + (f" · {rate:,.0f} tok/s" if rate else "")


def plain_line(update: dict[str, Any], eta_s: float | None = None) -> str:
    """The line printed instead of a bar: ``train tiny: step 10/30 loss 5.5540 · … · ETA 12 s`` (the worker's
    own words for the record where it sent them)."""
    step, total = update["step"], update["max_steps"]
    eta = f" · ETA {eta_s:.0f} s" if eta_s is not None and step < total else ""
    words = update.get("line") or f"step {step}/{total} {numbers(update)}"
    return f"train {update['run']}: {words}{eta}"


class Display:
    """The live progress of this process's training runs (one bar for all of them on a terminal; rate-limited
    plain lines otherwise). Thread-safe: Ray's log thread calls :meth:`update` and :meth:`write`."""

    def __init__(self, stream: TextIO | None = None, *, tty: bool | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stdout
        self.tty = _isatty(self.stream) if tty is None else tty
        self.interval_s = float(os.environ.get(INTERVAL_VAR, 15)) if interval_s is None else interval_s
        self.clock = clock
        self.runs: dict[str, dict[str, Any]] = {}  # run → its newest update (+ "_printed", "_start")
        self.finished: dict[str, int] = {}  # run → its last step shown (a record Ray forwards late is old news)
        self.bar = None
        self.status = None  # a pipeline's status line on a terminal (a tqdm of no bar)
        self.stages_shown = 0  # steps of the current pipeline printed in plain mode
        self.last_plain: float | None = None
        self.lock = threading.RLock()

    def stage(self, text: str) -> None:
        """One step of a pipeline (see the module docstring)."""
        logger.info(text)
        with self.lock:
            if self.tty:
                self._draw_status(text)
            elif not self.stages_shown or self.last_plain is None or \
                    self.clock() - self.last_plain >= self.interval_s:
                self.stream.write(text + "\n")
                self.stream.flush()
                self.stages_shown, self.last_plain = self.stages_shown + 1, self.clock()

    def end_stages(self) -> None:
        """The pipeline is over: its status line goes; the next pipeline's first step prints again."""
        with self.lock:
            self.stages_shown = 0
            if self.status is not None:
                self.status.close()
                self.status = None
                self._release_stdout()

    def _draw_status(self, text: str) -> None:
        if self.status is not None:
            self.status.set_description_str(text)
            return
        from tqdm import tqdm

        self.status = tqdm(total=None, file=self.stream, desc=text, bar_format="{desc}", leave=False,
                           ncols=shutil.get_terminal_size((120, 24)).columns or 120)
        self._hold_stdout()

    def update(self, update: dict[str, Any]) -> None:
        with self.lock:
            if update["step"] <= self.finished.get(update["run"], -1):
                return
            now = self.clock()
            before = self.runs.get(update["run"])
            start = (now, update["step"]) if before is None else before["_start"]
            # the last known validation result and tokens/s stay shown until newer ones come
            self.runs[update["run"]] = {**(before or {}), **update, "_start": start, "_printed": False}
            if self.tty:
                self._draw()
            elif before is None or update["step"] >= update["max_steps"] or self.last_plain is None \
                    or now - self.last_plain >= self.interval_s:
                self._print_plain(update["run"])

    def start(self, run: str) -> None:
        """A new fit of ``run`` in this process: its records count again, whatever an earlier fit reached."""
        with self.lock:
            self.finished.pop(run, None)

    def eta(self, run: str) -> float | None:
        """Seconds left for ``run`` at its rate since its first record (None before a second one)."""
        u = self.runs[run]
        t0, steps = u["_start"][0], u["step"] - u["_start"][1]
        return None if steps <= 0 else (self.clock() - t0) / steps * (u["max_steps"] - u["step"])

    def _print_plain(self, run: str, *, eta: bool = True) -> None:
        self.stream.write(plain_line(self.runs[run], self.eta(run) if eta else None) + "\n")
        self.stream.flush()
        self.runs[run]["_printed"], self.last_plain = True, self.clock()

    def _draw(self) -> None:
        runs = list(self.runs.values())
        total, done = sum(u["max_steps"] for u in runs), sum(u["step"] for u in runs)
        desc = f"train {runs[0]['run']}" if len(runs) == 1 else f"tune {len(runs)} trials"
        postfix = numbers(runs[0]) if len(runs) == 1 else trials(runs)
        if self.bar is None:
            from tqdm import tqdm

            size = shutil.get_terminal_size((120, 24))  # COLUMNS/LINES, the terminal, else 120 x 24
            self.bar = tqdm(total=total, initial=done, file=self.stream, unit="step", desc=desc, postfix=postfix,
                            ncols=size.columns or 120, nrows=size.lines or 24,
                            bar_format="{desc} {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} "
                                       "[{elapsed}<{remaining}]{postfix}")
            self._hold_stdout()
            return
        self.bar.total = total
        self.bar.set_description_str(desc, refresh=False)
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(done - self.bar.n)
        self.bar.refresh()

    def finish(self) -> None:
        """End the live progress: the bar stays as the last line; in plain mode each run's last record
        prints if the rate limit held it back."""
        with self.lock:
            self.end_stages()
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self._release_stdout()
            for run, update in self.runs.items():
                if not self.tty and not update["_printed"]:
                    self._print_plain(run, eta=False)  # an early stop's, or a stopped trial's: no time left
                self.finished[run] = update["step"]
            self.runs.clear()

    def write(self, emit: Callable[[], None]) -> None:
        """Run ``emit`` (it writes lines to the terminal) with the bar cleared first and drawn again after."""
        with self.lock:
            live = self.bar or self.status
            if live is None:
                emit()
                return
            with live.external_write_mode(file=self.stream):  # clears and redraws every line on the stream
                emit()

    def _hold_stdout(self) -> None:
        """Whatever prints while a line is live (Ray Tune's tables, log lines) goes above it."""
        if sys.stdout is self.stream:
            sys.stdout = AboveBar(self.stream, self)

    def _release_stdout(self) -> None:
        if self.bar is None and self.status is None and isinstance(sys.stdout, AboveBar) \
                and sys.stdout.shown is self:
            sys.stdout.flush()
            sys.stdout = self.stream


class AboveBar:
    """``sys.stdout`` while a bar is live: each whole line written is printed above the bar (through
    :meth:`Display.write`), so prints do not break it."""

    def __init__(self, out: TextIO, shown: Display):
        self.out, self.shown, self.partial = out, shown, ""

    def write(self, text: str) -> int:
        self.partial += text
        if "\n" in self.partial:
            lines, self.partial = self.partial.rsplit("\n", 1)
            self.shown.write(lambda: (self.out.write(lines + "\n"), self.out.flush()))
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.shown.write(lambda: self.out.write(self.partial))
            self.partial = ""
        self.out.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding, …: the terminal's
        return getattr(self.out, name)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


_display: Display | None = None


def display() -> Display:
    """This process's live progress (on its stdout, created on first use)."""
    global _display
    if _display is None or getattr(_display.stream, "closed", False):  # a closed stdout: a finished capture's
        _display = Display()
    return _display


def stage(text: str) -> None:
    """A pipeline's step on this process's live progress (:meth:`Display.stage`)."""
    display().stage(text)


def end_stages() -> None:
    display().end_stages()


@contextmanager
def live_progress():
    """A command's extent: whatever progress it showed ends with it (lm.commands wraps the jobs in it)."""
    try:
        yield display()
    finally:
        display().finish()
