"""Helpers of the tests that start Ray clusters of their own (test_jobs, test_multinode) beside the
suite's shared one, through cluster/local.py."""

import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).parents[2]
TOKEN = Path.home() / ".ray" / "auth_token"


def auth_mode() -> str:
    """Ray turns token authentication on when a token file exists; every node and client must then say so."""
    return "token" if TOKEN.exists() else "disabled"


def auth_headers() -> dict[str, str]:
    """The Jobs SDK's bearer token (a process settles its own auth mode when it first uses Ray)."""
    return {"Authorization": f"Bearer {TOKEN.read_text().strip()}"} if TOKEN.exists() else {}


def local_cluster(temp_dir: str, *args: str) -> str:
    """``python cluster/local.py --temp-dir TEMP_DIR ARGS``; its output (fails the test if it fails)."""
    done = subprocess.run([sys.executable, "cluster/local.py", "--temp-dir", temp_dir, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def kill_leftovers(temp_dir: str) -> list[str]:
    """Kill any process still running with ``temp_dir`` on its command line; their command lines."""
    left, names = [], []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in p.info["cmdline"] or ()):
                names.append(" ".join(p.info["cmdline"][:3]))
                left.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in left:
        p.kill()
    return names
