"""Multi-node behaviour on the local multi-node cluster of cluster/local.py (a head and two worker
nodes on this machine, each its own `ray start`): training whose two workers are spread over the two
worker nodes finishes, and when one worker node goes away mid-run (its processes killed) the run
recovers from its last checkpoint once the node is back, continuing the same step count; Serve's two
model replicas sit on the two worker nodes and the endpoint keeps answering when one node goes away."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import pytest
from clusters import auth_mode, kill_leftovers, local_cluster
from serving import KEY, free_port, model_dir

from lm.config import load_config
from lm.storage import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
TINY = REPO / "configs/tiny.yaml"


@pytest.fixture(scope="module")
def nodes():
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", auth_mode())  # the same for every node and client
        temp_dir = tempfile.mkdtemp(prefix="mn", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
        local_cluster(temp_dir, "up", "--workers", "2", "--cpus", "1", "--head-cpus", "1")
        yield json.loads((Path(temp_dir) / "local-cluster.json").read_text())
        local_cluster(temp_dir, "down")
        left = kill_leftovers(temp_dir)
        assert not left, left  # `down` stopped everything it started


def actor_nodes(dashboard: str, class_part: str) -> list[str]:
    """Node ids of the alive actors whose class name contains ``class_part`` (Ray's state API)."""
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "list", "actors", "--address", dashboard,
                           "--filter", "state=ALIVE", "--format", "json", "--limit", "1000"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    if not done.stdout.lstrip().startswith("["):  # "No resource in the cluster": no actors yet
        return []
    return [a["node_id"] for a in json.loads(done.stdout) if class_part in a["class_name"]]


def committed_checkpoint(run_dir: Path) -> bool:
    """Whether Ray Train has taken a checkpoint of the run: the second checkpoint folder exists, so the
    first one's report has been collected (a worker's report waits until the previous one is taken)."""
    return len(list((run_dir / "train" / "ray").glob("checkpoint_*"))) >= 2


def test_training_spread_over_two_nodes_recovers_when_one_goes_away(nodes, tiny_run, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": nodes["address"]}
    run = subprocess.Popen(  # on the session's tiny shards (a folder every node reads)
        [sys.executable, "jobs/train.py", "-c", str(TINY), f"storage.root={tmp_path}",
         f"data.output={tiny_run.cfg.data_uri}", "train.workers=2", "train.cpus_per_worker=0.5", "train.resources_per_worker={worker: 1}", "train.max_failures=3",
         "train.max_steps=200", "train.eval_interval=20", "train.log_interval=20"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 400
    try:
        workers: list[str] = []
        while len(workers) < 2 and time.monotonic() < deadline and run.poll() is None:
            workers = actor_nodes(nodes["dashboard"], "RayTrainWorker")
        assert len(workers) == 2 and len(set(workers)) == 2, workers  # the two training workers on two nodes
        while not committed_checkpoint(run_dir) and time.monotonic() < deadline and run.poll() is None:
            time.sleep(0.2)
        assert run.poll() is None, run.stdout.read()[-3000:]
        local_cluster(nodes["temp_dir"], "kill", "1")  # at once: a worker node goes away with one training worker
        assert run.poll() is None and not (run_dir / "model" / "config.json").exists(), "the run ended before the kill"
        time.sleep(5)
        local_cluster(nodes["temp_dir"], "add", "1")  # and comes back: the run can be whole again
        out, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:]
    resumed = [int(m) for m in re.findall(r"resumed at step (\d+)", out)]
    assert resumed and 20 <= resumed[0] < 200, [line for line in out.splitlines() if "step" in line][-20:]  # mid-run
    history = [json.loads(x) for x in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    evals = [h["step"] for h in history if "val_loss" in h]
    assert evals == sorted(set(evals)) and evals[-1] == 200  # one curve, every step counted once
    assert (run_dir / "model" / "config.json").exists()


def test_serve_replicas_on_two_nodes_keep_answering_when_one_goes_away(nodes, tmp_path):
    cfg = load_config(TINY, [f"storage.root={tmp_path}"])
    model = model_dir(ObjectStore(cfg.storage), cfg, f"{tmp_path}/model", seed=1)
    port = free_port()
    env = {**os.environ, "RAY_ADDRESS": nodes["address"], "LMFORGE_API_KEYS": KEY}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "lm"), "serve", "-c", str(TINY), f"storage.root={tmp_path}",
         f"serve.model={model}", f"serve.port={port}", "serve.proxy_location=HeadOnly", "serve.replica_cpus=0.25",
         "serve.replica_resources={worker: 1}", "serve.autoscaling.min_replicas=2", "serve.autoscaling.max_replicas=2"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        while "OpenAI-compatible" not in line and server.poll() is None:
            line = server.stdout.readline()
        assert server.poll() is None, server.stdout.read()[-3000:]
        placed = actor_nodes(nodes["dashboard"], "ServeReplica:lmforge:model")
        assert len(placed) == 2 and len(set(placed)) == 2, placed  # one replica on each worker node
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=10)
        answers: list[tuple[float, float, bool]] = []  # (sent, done, ok)
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                sent = time.monotonic()  # a request counts from when it was sent (a lost one fails at its timeout)
                try:
                    client.completions.create(model="lmforge", prompt="ROMEO:", max_tokens=4, temperature=0.7)
                    answers.append((sent, time.monotonic(), True))
                except Exception:
                    answers.append((sent, time.monotonic(), False))

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(3)
        gone = time.monotonic()
        local_cluster(nodes["temp_dir"], "kill", "2")  # one replica's node goes away
        time.sleep(20)
        stop.set()
        for t in threads:
            t.join()
    finally:
        os.killpg(server.pid, signal.SIGINT)  # `lm serve` shuts Serve down on Ctrl-C
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        local_cluster(nodes["temp_dir"], "add", "2")
    before = [ok for _, done, ok in answers if done < gone]
    failed_at = [round(sent - gone, 1) for sent, _, ok in answers if not ok]
    # the head declares the node dead after 3 failed health checks 1 s apart (cluster/local.py), then Serve
    # drops its replica
    settled = [ok for sent, _, ok in answers if sent > gone + 10]
    assert before and all(before)
    assert len(settled) >= 10 and all(settled), f"failures at {failed_at} s after the node loss"
    assert len(failed_at) <= 4, failed_at  # at most the requests that were on the lost replica
