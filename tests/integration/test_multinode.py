"""Multi-node behaviour on the local multi-node cluster of cluster/local.py (a head and three worker
nodes on this machine, each its own `ray start`): an elastic training group (train.workers [2, 3], one
worker per node) shrinks to 2 when a node goes away mid-run (its processes killed) and goes on from its
last checkpoint without waiting, then grows back to 3 when the node returns, one curve with every step
once and the same global batch throughout; Serve's two model replicas sit on two worker nodes and the
endpoint keeps answering when one node goes away."""

import contextlib
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
        local_cluster(temp_dir, "up", "--workers", "3", "--cpus", "1", "--head-cpus", "1")
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


def newest_state(run_dir: Path) -> dict | None:
    """The trainer state (step, world size, history) of the newest checkpoint Ray Train has committed (a
    folder Ray Train is still merging may lack it)."""
    states = sorted((run_dir / "train" / "ray").glob("checkpoint_*/trainer_state.json"))
    for state in reversed(states):
        with contextlib.suppress(OSError, ValueError):
            return json.loads(state.read_text())
    return None


def wait_for(what: str, check, run: subprocess.Popen, deadline: float):
    while time.monotonic() < deadline and run.poll() is None:
        if found := check():
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what}: not seen (run ended: {run.poll() is not None})")


def test_an_elastic_group_shrinks_when_a_node_goes_away_and_grows_when_it_comes_back(nodes, tiny_run, tmp_path):
    """train.workers [2, 3] on 3 worker nodes (one training worker per node): losing a node shrinks the group
    to 2, which goes on from the last checkpoint without waiting for the node; once the node is back the
    group grows to 3 again (Ray Train checks every elastic_resize_monitor_interval_s). The history holds every
    step once and the same global batch throughout (gradient accumulation 2 on 3 workers, 3 on 2). The run is
    stopped (its driver killed) once the grown group has checkpointed: a fixed number of steps would end too
    soon for the grow on a quiet machine or take minutes on a busy one."""
    env = {**os.environ, "RAY_ADDRESS": nodes["address"]}
    run = subprocess.Popen(  # on the session's tiny shards (a folder every node reads)
        [sys.executable, "jobs/train.py", "-c", str(TINY), f"storage.root={tmp_path}",
         f"data.output={tiny_run.cfg.data_uri}", "train.workers=[2, 3]", "train.global_batch_tokens=3072",
         "train.cpus_per_worker=0.5", "train.resources_per_worker={worker: 1}", "train.max_failures=3",
         "train.worker_start_timeout_s=20", "train.elastic_resize_monitor_interval_s=5", "train.max_steps=100000",
         "train.eval_interval=20", "train.log_interval=10"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir, deadline = tmp_path / "runs" / "tiny", time.monotonic() + 400

    def newest(world: int, after: int) -> dict | None:
        state = newest_state(run_dir)
        return state if state and state["world_size"] == world and state["step"] > after else None

    try:
        wait_for("3 training workers, one a node",
                 lambda: len(set(actor_nodes(nodes["dashboard"], "RayTrainWorker"))) == 3, run, deadline)
        wait_for("a checkpoint of 3 workers", lambda: newest(3, after=20), run, deadline)
        local_cluster(nodes["temp_dir"], "kill", "1")  # a worker node goes away with one training worker
        shrunk = wait_for("a checkpoint of 2 workers (the node not back)", lambda: newest(2, after=0), run, deadline)
        local_cluster(nodes["temp_dir"], "add", "1")  # and comes back
        grown = wait_for("a checkpoint of 3 workers again", lambda: newest(3, after=shrunk["step"]), run, deadline)
    finally:
        run.terminate()
        out, _ = run.communicate(timeout=60)
    history = grown["history"]
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[-1] == grown["step"]  # one curve, every step counted once
    sizes = [h["workers"] for h in history]
    shrink, grow = sizes.index(2), len(sizes) - sizes[::-1].index(2)  # 3 … 3, 2 … 2, 3 … 3
    assert set(sizes[:shrink]) == {3} and set(sizes[shrink:grow]) == {2} and set(sizes[grow:]) == {3}, sizes
    assert {h["global_batch_tokens"] for h in history} == {3072}
    resumed = list(dict.fromkeys(re.findall(r"resumed at step (\d+) on (\d+) workers", out)))  # once a node
    assert [int(w) for _, w in resumed] == [2, 3], resumed  # each change from the universal checkpoint
    assert history[-1]["loss"] < history[0]["loss"] - 1  # it learned throughout


def test_serve_replicas_on_two_nodes_keep_answering_when_one_goes_away(nodes, tmp_path):
    local_cluster(nodes["temp_dir"], "kill", "3")  # two worker nodes here: one replica on each
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
        local_cluster(nodes["temp_dir"], "add", "3")
    before = [ok for _, done, ok in answers if done < gone]
    failed_at = [round(sent - gone, 1) for sent, _, ok in answers if not ok]
    # the head declares the node dead after 3 failed health checks 1 s apart (cluster/local.py), then Serve
    # drops its replica
    settled = [ok for sent, _, ok in answers if sent > gone + 10]
    assert before and all(before)
    assert len(settled) >= 10 and all(settled), f"failures at {failed_at} s after the node loss"
    assert len(failed_at) <= 4, failed_at  # at most the requests that were on the lost replica
