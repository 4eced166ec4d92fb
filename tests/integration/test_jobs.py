"""`ray job submit`, as lmforge's users run it: a real head started with `ray start --head` (inside the
suite's private network namespace every Ray port is on 127.0.0.1) on a node whose environment holds
the S3 credentials (as an instance profile would), the tiny pipeline submitted as a job through the
Jobs SDK with the repository as its working directory and the real S3 server as storage, followed
until it succeeds, its artifacts checked in the bucket, and that cluster stopped by its own processes
(never `ray stop`, which would also stop the suite's shared cluster). Then `lm generate` reads the
job's model from S3, and wrong credentials give one clear error without the secret."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from clusters import auth_headers, auth_mode, kill_leftovers, local_cluster

from lm.cluster import worker_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".git", "lmforge-store", "**/__pycache__", "tests", ".ruff_cache", ".pytest_cache"]


@pytest.fixture
def head(s3_server, monkeypatch):
    """A Ray head of its own (cluster/local.py: `ray start --head --block` with ports of its own, so it
    can run beside the suite's cluster), on a node whose environment holds the S3 credentials; stopped
    at the end by killing exactly its processes."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", auth_mode())  # the same for `ray start` and the Jobs SDK
    for key, value in s3_server.env().items():  # what an instance profile gives a cloud node
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PATH", f"{BIN}:{os.environ['PATH']}")  # `python` in a job is this environment's
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    local_cluster(temp_dir, "up", "--workers", "0", "--head-cpus", "2")
    state = json.loads((Path(temp_dir) / "local-cluster.json").read_text())
    try:
        yield {"client": JobSubmissionClient(state["dashboard"], headers=auth_headers())}
    finally:
        local_cluster(temp_dir, "down")
        left = kill_leftovers(temp_dir)
        assert not left, left  # `down` stopped everything it started


@pytest.mark.s3
def test_the_tiny_pipeline_runs_as_a_submitted_job_on_s3(head, s3_server):
    from ray.job_submission import JobStatus

    client = head["client"]
    root = f"s3://{s3_server.new_bucket('job')}/lmforge"
    job = client.submit_job(
        # the plain training loop: Ray Train on a real multi-node cluster is test_multinode's; this is the job
        entrypoint=f"python jobs/pipeline.py --config configs/tiny.yaml storage.root={root} train.max_steps=20 "
                   "train.trainer=local eval.max_examples=4 'eval.prompts=[\"ROMEO:\"]'",
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
    # the data stages' first line and a summary, not Ray Data's progress dumps (lm --verbose shows them)
    assert "data: 1 files from 1 sources" in logs and "shards, vocabulary" in logs
    assert "logging_progress" not in logs and "Running Dataset" not in logs
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
