"""The run's log file: what the libraries (Ray, Ray Data/Train/Tune/Serve, DeepSpeed, …) log, Python
warnings, and the worker chatter lm.driver_output keeps off the terminal, in ``<run>/logs/<command>.log``
(a local folder; a run in object storage logs to ``$TMPDIR/lmforge/<name>/logs/``). A leaf: it imports
nothing of lm.

    path = open_log_file(run_uri, name, "run", verbose=False)   # lm.cli, once per command
    attach_libraries()                                           # lm.cluster.connect, after ``import ray``

The terminal keeps what matters: records at WARNING and above (INFO too with ``lm --verbose``) except the
libraries' deprecation notices to each other (DeprecationWarning, FutureWarning), which only the file gets.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
import time
from pathlib import Path

LIBRARIES = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "DeepSpeed", "deepspeed")
OURS = "lmforge"  # lm.driver_output's "lmforge.workers": INFO, so the file gets it (the terminal: WARNING and up)
DEPRECATION = re.compile(r":\d+: \w*(DeprecationWarning|FutureWarning): ")
# Ray's notices that ask nothing of a user, kept off the terminal: a local cluster has token auth on by default
NOTICES = re.compile(r"^Token authentication is enabled for this Ray cluster\.")
_state: dict = {}  # "file": the FileHandler, "verbose": bool


def log_path(run_uri: str, name: str, command: str) -> Path:
    """Where a command's log goes: under the run when it is a local folder, else a local temporary one."""
    local = run_uri.removeprefix("file://")
    if "://" in local:
        return Path(tempfile.gettempdir()) / "lmforge" / name / "logs" / f"{command}.log"
    return Path(local).expanduser().resolve() / "logs" / f"{command}.log"


class NoDeprecations(logging.Filter):
    """Drops the warnings module's DeprecationWarning and FutureWarning records (logging.captureWarnings) and
    Ray's :data:`NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ((record.name == "py.warnings" and DEPRECATION.search(message)) or NOTICES.search(message))


class RunFile(logging.FileHandler):
    """A log file created (folder, a header line) at its first record only: a command that fails before any
    work leaves nothing behind."""

    def __init__(self, path: Path, header: str):
        super().__init__(path, encoding="utf-8", delay=True)
        self.header = header

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        stream = super()._open()
        stream.write(self.header)
        return stream


class Unhandled(logging.Handler):
    """``logging.lastResort`` while the log file is open: a record no handler took (Ray's ``ray`` logger has
    none once ``ray.init(configure_logging=False)`` cleared them, and does not propagate) goes where the
    others go: the file, and the terminal as the console handler filters it."""

    def __init__(self, *targets: logging.Handler):
        super().__init__(logging.INFO)
        self.targets = targets

    def emit(self, record: logging.LogRecord) -> None:
        for target in self.targets:
            if record.levelno >= target.level:
                target.handle(record)


def open_log_file(run_uri: str, name: str, command: str, *, verbose: bool) -> Path:
    """Route this process's logging and warnings: everything at INFO and above to the command's log file,
    the terminal (stderr) as the module docstring says. Returns the file's path (created at the first
    record). Called again, the old file is closed first."""
    path = log_path(run_uri, name, command)
    close_log_file()
    file = RunFile(path, f"\n===== lm {command} {name} {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
    file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        console.addFilter(NoDeprecations())
    root = logging.getLogger()
    root.addHandler(file)
    root.addHandler(console)  # the root's own level stays: other libraries' INFO stays as they set it
    logging.getLogger(OURS).setLevel(logging.INFO)
    logging.captureWarnings(True)
    _state.update(file=file, console=console, verbose=verbose, last_resort=logging.lastResort)
    logging.lastResort = Unhandled(file, console)
    attach_libraries()
    return path


def attach_libraries() -> None:
    """The libraries that log to their own handlers and not to the root (Ray's ``ray`` logger, DeepSpeed's):
    the log file too, and their terminal handlers at WARNING unless verbose. Call again after importing
    them (lm.cluster.connect does, after ``ray.init``); a no-op without :func:`open_log_file`."""
    file = _state.get("file")
    if file is None:
        return
    for name in LIBRARIES:
        lib = logging.getLogger(name)
        if lib.propagate or not lib.handlers:  # no handlers: its records reach :class:`Unhandled`
            continue
        if file not in lib.handlers:
            lib.addHandler(file)
        if lib.level in (logging.NOTSET,) or lib.level > logging.INFO:
            lib.setLevel(logging.INFO)
        for handler in lib.handlers:
            if not isinstance(handler, logging.FileHandler) and isinstance(handler, logging.StreamHandler) \
                    and not _state["verbose"]:
                if not any(isinstance(f, NoDeprecations) for f in handler.filters):
                    quiet = NoDeprecations()
                    _state.setdefault("quieted", []).append((handler, handler.level, quiet))
                    handler.addFilter(quiet)
                handler.setLevel(max(handler.level, logging.WARNING))


def close_log_file() -> None:
    """Undo :func:`open_log_file` (tests; a second command in one process)."""
    file, console = _state.pop("file", None), _state.pop("console", None)
    if file is None:
        return
    root = logging.getLogger()
    for handler in (file, console):
        root.removeHandler(handler)
    for name in LIBRARIES:
        if file in logging.getLogger(name).handlers:
            logging.getLogger(name).removeHandler(file)
    for handler, level, quiet in _state.pop("quieted", []):
        handler.setLevel(level)
        handler.removeFilter(quiet)
    logging.lastResort = _state.pop("last_resort", logging.lastResort)
    logging.captureWarnings(False)
    file.close()
