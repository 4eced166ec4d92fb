"""Measure an elastic training group (train.workers [2, 3]) losing a node and getting it back, on the
multi-node cluster of cluster/local.py (a head and 3 worker nodes on this machine, one training worker
per node): how long from the node's loss until the group of 2 trains again (the head declaring the node
dead, the group restarting, the universal checkpoint converted and loaded), how long from the node's
return until the group of 3 trains again (within ``--monitor-s``, Ray Train's
``elastic_resize_monitor_interval_s``), how many steps each change computes again (those after the last
checkpoint), and that the history holds each step once with one global batch. (Not tokens/s per size: the
three nodes share this machine's cores.)

    tests/isolated .venv/bin/python jobs/bench/elastic.py      # → jobs/bench/results/elastic.json

Times are stamped as the driver's output lines arrive (``resumed at step N on W workers`` and the step
lines): the first step line after a resume is when the new group trains.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_io import machine, write_result

REPO = Path(__file__).parents[2]
STEP = re.compile(r"step +(\d+)/\d+")
EVENT = re.compile(r"step +(?P<step>\d+)/\d+|resumed at step (?P<resumed>\d+) on (?P<world>\d+) workers")


def local_cluster(temp_dir: str, *args: str) -> None:
    subprocess.run([sys.executable, "cluster/local.py", "--temp-dir", temp_dir, *args], cwd=REPO, check=True,
                   capture_output=True, text=True, timeout=300)


class Lines:
    """The run's output lines, each with the time it arrived, read in a thread."""

    def __init__(self, proc: subprocess.Popen):
        self.queue: queue.Queue = queue.Queue()
        self.text: list[str] = []
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.text.append(line)
            self.queue.put((time.monotonic(), line))
        self.queue.put((time.monotonic(), None))

    def until(self, pattern: re.Pattern, timeout: float = 600) -> tuple[float, re.Match]:
        """The arrival time and match of the next line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            at, line = self.queue.get(timeout=deadline - time.monotonic())
            if line is None:
                raise SystemExit("elastic bench: the run ended early:\n" + "".join(self.text[-40:]))
            if found := pattern.search(line):
                return at, found
        raise SystemExit(f"elastic bench: no line matching {pattern.pattern!r} within {timeout:.0f} s")


def change(lines: Lines, since: float, world: int) -> dict:
    """Wait for the resume on ``world`` workers and its first step: the seconds since ``since``, and the
    steps computed again (the last step before the change minus the step it resumed at)."""
    last_step = 0
    while True:
        at, found = lines.until(EVENT)
        if found.group("step"):
            last_step = int(found.group("step"))
        elif int(found.group("world")) == world:
            break
    trains_at, _ = lines.until(STEP)
    resumed = int(found.group("resumed"))
    return {"resumed_at_step": resumed, "last_step_before": last_step, "steps_again": last_step - resumed,
            "resumed_s": round(at - since, 1), "training_again_s": round(trains_at - since, 1)}


def plot(history: list[dict], shrink: dict, grow: dict, path: Path) -> None:
    """The loss by step, each point coloured by the group's size, the two resumes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for world, colour in ((3, "tab:blue"), (2, "tab:orange")):
        points = [(h["step"], h["loss"]) for h in history if h.get("workers") == world]
        ax.scatter(*zip(*points, strict=True), s=6, color=colour, label=f"{world} workers")
    for change, what in ((shrink, "node lost: resumed on 2"), (grow, "node back: resumed on 3")):
        ax.axvline(change["resumed_at_step"], color="grey", linestyle=":")
        ax.annotate(f"{what}\n(+{change['training_again_s']:.0f} s)", (change["resumed_at_step"], ax.get_ylim()[1]),
                    fontsize=8, va="top", ha="left")
    ax.set(xlabel="step", ylabel="training loss", title="elastic group train.workers [2, 3]: one curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace, temp_dir: str, store: str) -> dict:
    state = json.loads((Path(temp_dir) / "local-cluster.json").read_text())
    proc = subprocess.Popen(
        [sys.executable, "jobs/train.py", "-c", "configs/tiny.yaml", f"storage.root={store}", "train.workers=[2, 3]",
         "train.global_batch_tokens=12288", "train.cpus_per_worker=0.5", "train.resources_per_worker={worker: 1}",
         "train.max_failures=3", f"train.worker_start_timeout_s={args.start_timeout_s}",
         f"train.elastic_resize_monitor_interval_s={args.monitor_s}",
         f"train.max_steps={args.steps}", f"train.eval_interval={args.eval_interval}", "train.log_interval=1"],
        cwd=REPO, env={**os.environ, "RAY_ADDRESS": state["address"], "RAY_DEDUP_LOGS": "0"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    lines = Lines(proc)
    while int(lines.until(STEP)[1].group(1)) < args.kill_at:
        pass
    killed = time.monotonic()
    local_cluster(temp_dir, "kill", "1")
    shrink = change(lines, killed, 2)
    time.sleep(args.away_s)
    added = time.monotonic()
    local_cluster(temp_dir, "add", "1")
    grow = change(lines, added, 3)
    if proc.wait(timeout=900) != 0:
        raise SystemExit("elastic bench: the run failed:\n" + "".join(lines.text[-40:]))
    history = [json.loads(x) for x in (Path(store) / "runs/tiny/train/metrics.jsonl").read_text().splitlines()]
    plot(history, shrink, grow, Path(args.out).with_suffix(".png"))
    return {"shrink": shrink, "grow": grow,
            "steps_once": [h["step"] for h in history] == sorted({h["step"] for h in history}),
            "global_batch_tokens": sorted({h["global_batch_tokens"] for h in history})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-interval", type=int, default=20, help="a checkpoint every N steps")
    parser.add_argument("--kill-at", type=int, default=50, help="the step at which a worker node goes away")
    parser.add_argument("--away-s", type=float, default=20, help="how long the node stays away")
    parser.add_argument("--start-timeout-s", type=float, default=20, help="train.worker_start_timeout_s")
    parser.add_argument("--monitor-s", type=float, default=5, help="train.elastic_resize_monitor_interval_s")
    parser.add_argument("--out", default=str(REPO / "jobs/bench/results/elastic.json"))
    args = parser.parse_args()
    token = Path.home() / ".ray" / "auth_token"  # Ray uses token authentication when this file exists:
    os.environ.setdefault("RAY_AUTH_MODE", "token" if token.exists() else "disabled")  # every node the same
    temp_dir = tempfile.mkdtemp(prefix="el", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    local_cluster(temp_dir, "up", "--workers", "3", "--cpus", "1", "--head-cpus", "1")
    try:
        with tempfile.TemporaryDirectory(prefix="lm-elastic-") as store:
            result = run(args, temp_dir, store)
    finally:
        local_cluster(temp_dir, "down")
    write_result(args.out, {"machine": machine(), "config": "tiny, train.workers [2, 3], 12288-token global batch",
                            "eval_interval": args.eval_interval, "monitor_s": args.monitor_s,
                            "start_timeout_s": args.start_timeout_s, **result})


if __name__ == "__main__":
    main()
