"""A multi-node Ray cluster on one machine, for development and tests: a head and N worker nodes,
each a `ray start --block` of its own (its own process group), with distinct custom resources
(``head``, ``worker-1`` … ``worker-N``) so that work can be pinned to, or spread over, nodes.

    python cluster/local.py up --workers 2 --cpus 1      # prints RAY_ADDRESS=127.0.0.1:PORT
    RAY_ADDRESS=127.0.0.1:PORT lm train -c configs/tiny.yaml train.workers=2 \
        'train.resources_per_worker={worker: 1}'          # one training worker per worker node
    python cluster/local.py kill 1                       # worker node 1 goes away (its processes killed)
    python cluster/local.py add 1                        # and comes back
    python cluster/local.py down                         # stops every node of this cluster, nothing else

Every node listens on 127.0.0.1 (run it inside ``../shared/tools/loopback-only`` on a shared host).
The state (ports, process ids) is kept in ``<temp-dir>/local-cluster.json``; ``down`` stops exactly
those processes and the Ray daemons under ``<temp-dir>``, never a machine-wide ``ray stop``. The head
declares a node that stops answering dead after ~3 s (Ray's defaults: ~15 s). Needs Ray's ``ray``
command beside this Python.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
STATE = "local-cluster.json"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


# The head checks every node each second and declares it dead after 3 missed checks (~3 s; Ray's
# defaults take ~15 s): on one machine a node that stops answering has gone away.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """``ray start --block ARGS`` in a process group of its own; returns its pid."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})})
    return proc.pid


def _node_args(name: str, cpus: int, worker: bool) -> list[str]:
    agent, grpc, metrics, runtime_env, manager, objects = _free_ports(6)  # defaults would collide between nodes
    resources = {name: 1, "worker": 1} if worker else {name: 1}
    return ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", f"--resources={json.dumps(resources)}",
            f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}"]


def _wait_for_nodes(address: str, count: int, timeout: float = 120) -> None:
    import ray

    deadline = time.monotonic() + timeout
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        while time.monotonic() < deadline:
            if sum(n["Alive"] for n in ray.nodes()) >= count:
                return
            time.sleep(0.5)
        raise SystemExit(f"local cluster: {count} nodes did not come up within {timeout:.0f} s")
    finally:
        ray.shutdown()


def up(temp_dir: Path, workers: int, cpus: int, head_cpus: int) -> dict:
    temp_dir.mkdir(parents=True, exist_ok=True)
    port, dashboard, client = _free_ports(3)
    address = f"127.0.0.1:{port}"
    state = {"address": address, "dashboard": f"http://127.0.0.1:{dashboard}", "temp_dir": str(temp_dir),
             "cpus": cpus, "nodes": {}}
    state["nodes"]["head"] = _start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
                                     f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                                     *_node_args("head", head_cpus, False)],
                                    temp_dir / "head.log", HEAD_ENV)
    _wait_for_nodes(address, 1)
    for i in range(1, workers + 1):  # one at a time: nodes starting together race for the same ports
        state["nodes"][f"worker-{i}"] = _start([f"--address={address}", *_node_args(f"worker-{i}", cpus, True)],
                                                temp_dir / f"worker-{i}.log")
        _wait_for_nodes(address, 1 + i)
    (temp_dir / STATE).write_text(json.dumps(state, indent=2))
    return state


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pid, sig)


def kill(temp_dir: Path, name: str) -> None:
    """Stop one node at once (SIGKILL to its process group): a machine that went away."""
    state = json.loads((temp_dir / STATE).read_text())
    _signal(state["nodes"].pop(name), signal.SIGKILL)
    (temp_dir / STATE).write_text(json.dumps(state, indent=2))


def add(temp_dir: Path, name: str) -> None:
    state = json.loads((temp_dir / STATE).read_text())
    state["nodes"][name] = _start([f"--address={state['address']}", *_node_args(name, state["cpus"], True)],
                                  temp_dir / f"{name}.log")
    (temp_dir / STATE).write_text(json.dumps(state, indent=2))


def _cluster_processes(temp_dir: Path) -> list:
    """This cluster's processes: every Ray daemon has the cluster's temp dir on its command line."""
    import psutil  # a dependency of Ray

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        with contextlib.suppress(psutil.Error):
            line = " ".join(p.info["cmdline"] or ())
            mine = p.pid != os.getpid() and str(temp_dir) in line and "ray" in line
            if mine and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def down(temp_dir: Path, grace_s: float = 3) -> None:
    """Stop every node of this cluster: SIGTERM to the node groups, SIGKILL once ``grace_s`` has passed,
    then SIGKILL to any of its daemons still there (one in a session of its own) until none is left."""
    state = json.loads((temp_dir / STATE).read_text())
    for pid in state["nodes"].values():
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _cluster_processes(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in state["nodes"].values():
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (left := _cluster_processes(temp_dir)) and time.monotonic() < deadline:
        for p in left:
            with contextlib.suppress(Exception):
                p.kill()
        time.sleep(0.2)
    (temp_dir / STATE).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--temp-dir", default="/tmp/lmforge-cluster", help="Ray's temp dir and this tool's state")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="start a head and N worker nodes")
    start.add_argument("--workers", type=int, default=2)
    start.add_argument("--cpus", type=int, default=1, help="CPUs each worker node offers")
    start.add_argument("--head-cpus", type=int, default=1, help="CPUs the head offers")
    for name in ("kill", "add"):
        p = sub.add_parser(name, help=f"{name} worker node N")
        p.add_argument("n", type=int)
    sub.add_parser("down", help="stop every node of this cluster")
    args = parser.parse_args(argv)
    temp_dir = Path(args.temp_dir)
    if args.command == "up":
        state = up(temp_dir, args.workers, args.cpus, args.head_cpus)
        print(f"RAY_ADDRESS={state['address']}  (dashboard {state['dashboard']}; {len(state['nodes'])} nodes)")
    elif args.command == "kill":
        kill(temp_dir, f"worker-{args.n}")
    elif args.command == "add":
        add(temp_dir, f"worker-{args.n}")
    else:
        down(temp_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
