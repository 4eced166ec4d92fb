"""What the driver shows of its Ray workers' output. Ray forwards every worker's stdout and stderr lines to
the driver (``log_to_driver``); :func:`install` puts a filter in front of Ray's printer:

- a rank-0 training record (lm.progress.TAG) goes to the live progress line (lm.progress.display);
- a line a worker tagged for the log file (lm.progress.FILE_TAG: a trial's start and end lines) goes there,
  untagged, and to the terminal too with ``lm --verbose``;
- known library chatter goes to the run's log file (lm.logfile), not the terminal, unless ``lm --verbose``
  (:data:`CHATTER`): DeepSpeed's "… built successfully" on every communicator set-up, Ray Train's
  "Reporting training result …" reprs and placement-group clean-up, Ray's C++ note that an actor's
  constructor arguments live in the object store, Ray Serve's INFO lines and its "Cannot deregister
  autoscaling state" warning, Ray Data's per-dataset INFO lines when it runs inside a task, the raylet's
  count of worker processes started (a sweep starts several trials' workers at once), torch's note that a
  host without reverse DNS gives its sockets no hostname;
- every other line, warnings and errors included, is printed by Ray as before (with the bar cleared).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

from lm.progress import FILE_TAG, Display, display, parse_progress

HANDLER = "ray_print_logs"  # the name Ray gives its printer in the driver's stdstream dispatcher
CHATTER = (
    re.compile(r"^DeepSpeed \S+ built successfully$"),
    re.compile(r"^Reporting training result \d+: "),
    re.compile(r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store"),
    re.compile(r"^INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ "),  # Ray Serve's controller, proxy, replicas at INFO
    re.compile(r"Cannot deregister autoscaling state for .* because it is not registered"),  # Serve's bookkeeping
    re.compile(r"^(Starting execution of|Execution plan of) Dataset |^Progress bars disabled\. |"
               r"^\S+\s+Dataset \S+ execution finished in "),  # Ray Data run inside a task
    re.compile(r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group"),
    re.compile(r"WARNING: \d+ PYTHON worker processes have been started on node: .* maximum expected startup"),
    re.compile(r"\[c10d\] The hostname of the client socket cannot be retrieved"),  # no reverse DNS: gloo is fine
)
logger = logging.getLogger("lmforge.workers")  # → the run's log file (lm.logfile), INFO: not the terminal


def chatter(line: str) -> bool:
    """Whether ``line`` is library chatter (see the module docstring) rather than something to show."""
    return any(p.search(line) for p in CHATTER)


def sort_lines(lines: Iterable[str], *, verbose: bool) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """A batch of worker lines as (progress records, chatter for the log file, lines to print)."""
    progress, quiet, shown = [], [], []
    for line in lines:
        update = parse_progress(line)
        if update is not None:
            progress.append(update)
        elif (at := line.find(FILE_TAG)) >= 0:
            (shown if verbose else quiet).append(line[:at] + line[at + len(FILE_TAG):])
        elif not verbose and chatter(line):
            quiet.append(line)
        else:
            shown.append(line)
    return progress, quiet, shown


def filtered(printer: Callable[[dict], None], progress: Display, *, verbose: bool) -> Callable[[dict], None]:
    """Ray's ``printer`` of a log batch (a dict with ``lines``, ``pid``, ``actor_name``, ``is_err``, …) behind
    the filter of the module docstring."""

    def handle(data: dict) -> None:
        updates, quiet, shown = sort_lines(data.get("lines") or [], verbose=verbose)
        for update in updates:
            progress.update(update)
        source = data.get("actor_name") or data.get("task_name") or "worker"
        for line in quiet:
            logger.info("(%s pid=%s) %s", source, data.get("pid"), line)
        if shown:
            progress.write(lambda: printer({**data, "lines": shown}))

    handle.lmforge = True  # installed once
    return handle


def install(*, verbose: bool) -> bool:
    """Put :func:`filtered` in front of Ray's printer in this driver (after ``ray.init``): the workers' lines
    and the raylet's messages to the driver (its count of worker processes started, which Ray's error
    listener prints itself); False where Ray prints no worker output here (``log_to_driver=False``, a worker
    process)."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    raylet_printer = ray_worker.print_to_stdstream  # what listen_error_messages calls, looked up at each call
    if not getattr(raylet_printer, "lmforge", False):
        def raylet_messages(data: dict, ignore_prefix: bool) -> None:
            printer = functools.partial(raylet_printer, ignore_prefix=ignore_prefix)
            filtered(printer, display(), verbose=verbose)(data)

        raylet_messages.lmforge = True
        ray_worker.print_to_stdstream = raylet_messages

    with dispatcher._lock:
        handlers = list(dispatcher.handlers)
    current = next((h for name, h in handlers if name == HANDLER), None)
    if current is None or getattr(current, "lmforge", False):
        return current is not None
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, filtered(current, display(), verbose=verbose))
    return True
