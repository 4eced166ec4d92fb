"""Connecting to Ray: the one ``ray.init`` every stage uses (data pipeline, training, ...).

    ray = connect()     # joins RAY_ADDRESS (e.g. under `ray job submit`) or starts a local instance

Workers get ``DS_ACCELERATOR`` (this process's own, else the device found here: :func:`accelerator`),
``TORCH_EXTENSIONS_DIR`` (DeepSpeed's compiled-ops cache) and ``LMFORGE_CODE_COMMIT`` (the code commit,
lm.provenance) from this process; worker output is shown here through lm.driver_output (the trainer's
progress records as the live progress line, library chatter into the run's log file: lm.logfile).
"""

from __future__ import annotations

import os

from lm.provenance import COMMIT_ENV, code_commit

SERVE_PROXY_MIDDLEWARES = "lm.serve.proxy:middlewares"  # a dead replica's requests: 503, not a bare 500


def accelerator() -> str:
    """DeepSpeed's accelerator: ``DS_ACCELERATOR`` when set, else "cuda" where torch sees a GPU, else
    "cpu"."""
    if os.environ.get("DS_ACCELERATOR"):
        return os.environ["DS_ACCELERATOR"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def verbose() -> bool:
    """Whether the libraries' own progress and INFO output is wanted (``lm --verbose``: LMFORGE_VERBOSE)."""
    return bool(os.environ.get("LMFORGE_VERBOSE"))


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: CPU or GPU DeepSpeed (:func:`accelerator`), the JIT-compiled ops cache
    of this process, the code commit (lm.provenance), and the middleware Serve's HTTP proxy loads
    (lm.serve.proxy) when this job starts
    Serve."""
    env = {"DS_ACCELERATOR": accelerator(),
           "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": SERVE_PROXY_MIDDLEWARES}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    if commit := code_commit():  # the workers have no .git (lm.provenance)
        env[COMMIT_ENV] = commit
    if not verbose():  # the libraries' deprecation notices to each other (torch, DeepSpeed, Ray) stay quiet
        env["PYTHONWARNINGS"] = "ignore::FutureWarning,ignore::DeprecationWarning"
    else:
        env["LMFORGE_VERBOSE"] = "1"  # lm.train.run_log leaves Ray Train's INFO lines on too
    return env


def _job_env_vars() -> dict[str, str]:
    """The environment variables of the runtime env this process was submitted with (``ray job submit``)."""
    import json

    injected = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return ((json.loads(injected).get("runtime_env") or {}).get("env_vars") or {}) if injected else {}


def connect():
    """``ray`` after ``ray.init`` (once per process; an existing connection is kept as it is). In a
    submitted job, only the variables its own runtime env does not set are added (Ray refuses to merge
    the same key twice)."""
    import ray

    from lm.driver_output import install
    from lm.logfile import attach_libraries

    attach_libraries()  # Ray's own logger: into the run's log file (lm.logfile), WARNING and up on the terminal
    if not ray.is_initialized():
        submitted = _job_env_vars()
        extra = {k: v for k, v in worker_env().items() if k not in submitted}
        ray.init(configure_logging=False, runtime_env={"env_vars": extra} if extra else None)
    quiet_ray_data()
    install(verbose=verbose())  # worker lines: progress bar, chatter to the log file, the rest printed
    return ray


def quiet_ray_data() -> None:
    """Unless ``LMFORGE_VERBOSE`` is set (``lm --verbose``): Ray Data's per-stage progress dumps and INFO
    lines stay out of the output (~130 lines for the tiny preset's data pipeline); lmforge prints one line
    per stage, and Ray Data's warnings and errors still show. Its logs are in Ray's session folder."""
    if verbose():
        return
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
