"""`ray job submit`, as lmforge's users run it: a real head started with `ray start --head` (inside the
suite's private network namespace every Ray port is on 127.0.0.1) on a node whose environment holds
the S3 credentials (as an instance profile would), the tiny pipeline submitted as a job through the
Jobs SDK with the repository as its working directory and the real S3 server as storage, followed
until it succeeds, its artifacts checked in the bucket, and that cluster stopped by its own processes
(never `ray stop`, which would also stop the suite's shared cluster). Then `lm generate` reads the
job's model from S3, and wrong credentials give one clear error without the secret."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from serving import free_port

from lm.cluster import worker_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".git", "lmforge-store", "**/__pycache__", "tests", ".ruff_cache", ".pytest_cache"]


def _cluster_processes(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in p.info["cmdline"] or ()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


TOKEN = Path.home() / ".ray" / "auth_token"


def auth_mode() -> str:
    """Ray turns token authentication on when a token file exists; every side must then say so."""
    return "token" if TOKEN.exists() else "disabled"


def auth_headers() -> dict[str, str]:
    """The Jobs SDK's bearer token (this process settled its own auth mode when it first used Ray)."""
    return {"Authorization": f"Bearer {TOKEN.read_text().strip()}"} if TOKEN.exists() else {}


@pytest.fixture
def head(s3_server, monkeypatch):
    """A Ray head of its own (`ray start --head --block`), stopped at the end by killing its processes."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", auth_mode())  # the same for `ray start` and the Jobs SDK

    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dashboard, ray_client = free_port(), free_port(), free_port()
    env = {**os.environ, **s3_server.env(), "PATH": f"{BIN}:{os.environ['PATH']}"}  # `python` in a job is ours
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}",
                             f"--ray-client-server-port={ray_client}",
                             "--disable-usage-stats"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    client, error, deadline = None, None, time.monotonic() + 120
    while client is None and time.monotonic() < deadline and proc.poll() is None:
        try:
            client = JobSubmissionClient(address, headers=auth_headers())
            client.list_jobs()
        except Exception as err:  # not up yet
            client, error = None, err
            time.sleep(1)
    try:
        assert client is not None, f"the head did not come up: {error!r}"
        yield {"client": client, "address": address, "gcs": f"127.0.0.1:{port}", "temp_dir": temp_dir}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _cluster_processes(temp_dir):  # anything left of this cluster (workers, agents)
            p.kill()
        psutil.wait_procs(_cluster_processes(temp_dir), timeout=10)


@pytest.mark.s3
def test_the_tiny_pipeline_runs_as_a_submitted_job_on_s3(head, s3_server):
    from ray.job_submission import JobStatus

    client = head["client"]
    root = f"s3://{s3_server.new_bucket('job')}/lmforge"
    job = client.submit_job(
        entrypoint=f"python jobs/pipeline.py --config configs/tiny.yaml storage.root={root} train.max_steps=20 "
                   "eval.max_examples=4 'eval.prompts=[\"ROMEO:\"]'",
        runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": worker_env()})
    deadline, status = time.monotonic() + 600, None
    while time.monotonic() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"→ {root}/runs/tiny/model;" in logs and f"evaluation report → {root}/runs/tiny/eval/report.md" in logs
    store = s3_server.store(root=root)
    assert store.is_published(f"{root}/runs/tiny/model")
    for artifact in ("data/manifest.json", "data/tokenizer.json", "model/model.safetensors", "eval/report.md",
                     "train/metrics.jsonl", "samples.json"):
        assert store.exists(f"{root}/runs/tiny/{artifact}"), artifact
    info = client.get_job_info(job)
    assert info.entrypoint.startswith("python jobs/pipeline.py") and info.runtime_env["working_dir"].startswith("gcs://")

    # the job's model, read back from S3 by the CLI (configured only by the standard AWS_* variables)
    env = {**os.environ, **s3_server.env()}
    gen = subprocess.run([str(BIN / "lm"), "generate", "-c", "configs/tiny.yaml", f"storage.root={root}",
                          "--prompt", "KING:"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("KING:") and len(store.list(f"{root}/runs/tiny/generations")) == 1
    # wrong credentials: one clear error naming the URI, no secret in it, exit 2
    bad = subprocess.run([str(BIN / "lm"), "run", "-c", "configs/tiny.yaml", f"storage.root={root}"], cwd=REPO,
                         env={**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"},
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and root in bad.stderr and "wrong-secret-value" not in bad.stderr
    assert "Traceback" not in bad.stderr
