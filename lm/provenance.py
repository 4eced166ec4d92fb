"""The code commit a run was made with, captured where the job is submitted and passed along.

Ray's runtime environment leaves ``.git`` behind (``ray job submit --working-dir .`` uploads the files,
not the repository), so a worker cannot ask git itself. The commit travels as ``LMFORGE_CODE_COMMIT``:

* ``lm run`` / ``lm train`` on this machine: :func:`code_commit` asks git in the checkout lmforge runs
  from, and lm.cluster.worker_env hands the answer to every Ray worker;
* ``ray job submit``: the submitter sets it in the job's runtime env (Ray passes a job's env_vars on to
  its tasks and actors)::

    ray job submit --working-dir . --runtime-env-json \\
        "{\\"env_vars\\": {\\"LMFORGE_CODE_COMMIT\\": \\"$(git rev-parse HEAD)\\"}}" -- python jobs/train.py -c ...

A checkout with uncommitted changes reads ``<sha>-dirty``; no git and no variable reads None.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

COMMIT_ENV = "LMFORGE_CODE_COMMIT"


def code_commit() -> str | None:
    """``$LMFORGE_CODE_COMMIT`` when set, else the checkout's HEAD (``-dirty`` with local changes), else None."""
    return os.environ.get(COMMIT_ENV) or _git_commit()


@functools.cache
def _git_commit() -> str | None:
    here = Path(__file__).parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=here, timeout=10,
                              check=True).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None
