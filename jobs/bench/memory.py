"""Peak memory of a Ray workload, sampled by a thread (the scale, data and soak benchmarks share it): the
USS, PSS and anonymous memory of every Ray worker process by role (from its process title), the driver's
RSS, and the object store's bytes in use and spilled to disk (a raylet RPC, every 5th sample); also a
timeline of the RSS and USS summed per role at each sample (the soak benchmark reads growth from it).

A worker's USS includes the object-store pages (shared memory) that only it has touched: the blocks it
wrote, until they are freed, even while it is idle. Its anonymous memory (``Anonymous`` of
/proc/<pid>/smaps_rollup) is its own heap alone; the object store is measured on its own."""

from __future__ import annotations

import threading
import time
from typing import ClassVar

import psutil

MIB = 2**20


class Sampler:
    """Every ``interval`` s: the USS and PSS of each Ray worker process (by role: ``roles`` maps a title
    substring to a role, Ray Data's processes are "Ray Data", the rest "other Ray workers"), this
    process's RSS, and the object store's bytes in use and spilled. Peaks per process and of the sum per
    role at one instant; ``timeline``: ``(time.monotonic(), {role: (rss, uss, processes)})`` per sample.
    Start it after Ray is up (``ray.init``/``lm.cluster.connect``)."""

    RAY_DATA: ClassVar[tuple[str, ...]] = ("Read", "SplitCoordinator", "FooterReader", "ListFiles", "Map",
                                           "_StatsActor", "DatasetManager", "_AutoscalingCoordinator",
                                           "Sort", "Aggregate", "HashShuffle", "Write")

    def __init__(self, interval: float, roles: dict[str, str] | None = None):
        import ray
        from ray._private.internal_api import get_state_from_address

        self.interval, self.roles, self.procs, self.sums, self.titles = interval, roles or {}, {}, {}, set()
        self.object_store = self.spilled = self.driver = 0
        self.samples, self.errors = 0, []
        self.timeline: list[tuple[float, dict[str, tuple[int, int, int]]]] = []
        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="memory-sampler")

    def role(self, title: str) -> str | None:
        if not title.startswith("ray::"):
            return None
        mine = next((r for key, r in self.roles.items() if key in title), None)
        if mine is None and any(key in title for key in self.RAY_DATA):
            return "Ray Data"
        return mine or "other Ray workers"

    def _tick(self) -> None:
        self.driver = max(self.driver, psutil.Process().memory_info().rss)
        sums: dict[str, list[int]] = {}
        now_rss: dict[str, tuple[int, int, int]] = {}
        for p in psutil.process_iter(["cmdline"]):
            title = " ".join(p.info["cmdline"] or []).strip()
            role = self.role(title)
            if role is None:
                continue
            try:
                m = p.memory_full_info()
            except psutil.Error:
                continue
            anon = _anonymous(p.pid)
            rec = self.procs.setdefault(p.pid, {"role": role, "first_uss": m.uss, "uss": 0, "pss": 0, "anon": 0})
            rec["anon"] = max(rec["anon"], anon)
            if rec["role"] == "other Ray workers" and role != rec["role"]:
                rec["role"] = role
            if m.uss > rec["uss"]:
                rec["title"] = title[:80]  # what the process was doing at its peak
            steps = rec.setdefault("by_title", {})
            steps[title[:80]] = max(steps.get(title[:80], 0), m.uss)
            rec["uss"], rec["pss"] = max(rec["uss"], m.uss), max(rec["pss"], m.pss)
            self.titles.add(title.split(" ")[0][:60])
            now = sums.setdefault(rec["role"], [0, 0, 0])
            now[0], now[1], now[2] = now[0] + m.uss, now[1] + m.pss, now[2] + anon
            rss, uss, n = now_rss.get(rec["role"], (0, 0, 0))
            now_rss[rec["role"]] = (rss + m.rss, uss + m.uss, n + 1)
        for role, now in sums.items():
            self.sums[role] = [max(a, b) for a, b in zip(self.sums.get(role, (0, 0, 0)), now, strict=True)]
        self.timeline.append((time.monotonic(), now_rss))

    def _object_store(self) -> None:
        from ray._private.internal_api import get_memory_info_reply

        try:
            stats = get_memory_info_reply(self.state).store_stats
            self.object_store = max(self.object_store, stats.object_store_bytes_used)
            self.spilled = max(self.spilled, stats.spilled_bytes_total)
        except Exception as err:  # reported, never fatal to the measurement
            self.errors.append(repr(err)[:200])

    def _run(self) -> None:
        while True:
            self._tick()
            if self.samples % 5 == 0:
                self._object_store()
            self.samples += 1
            if self._stop.wait(self.interval):
                break
        self._object_store()

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        roles = {}
        for role in sorted({r["role"] for r in self.procs.values()}):
            mine = [r for r in self.procs.values() if r["role"] == role]
            roles[role] = {"processes": len(mine), "peak_uss_mib": round(max(r["uss"] for r in mine) / MIB, 1),
                           "peak_pss_mib": round(max(r["pss"] for r in mine) / MIB, 1),
                           "first_uss_mib": round(max(r["first_uss"] for r in mine) / MIB, 1),
                           "largest_at": max(mine, key=lambda r: r["uss"])["title"],
                           "largest_by_title": {t: round(u / MIB) for t, u in max(mine, key=lambda r: r["uss"])[
                               "by_title"].items()},
                           "peak_sum_uss_mib": round(self.sums[role][0] / MIB, 1),
                           "peak_sum_pss_mib": round(self.sums[role][1] / MIB, 1),
                           "peak_anon_mib": round(max(r["anon"] for r in mine) / MIB, 1),
                           "peak_sum_anon_mib": round(self.sums[role][2] / MIB, 1)}
        return {"roles": roles, "driver_peak_rss_mib": round(self.driver / MIB, 1),
                "object_store_peak_mib": round(self.object_store / MIB, 1),
                "spilled_mib": round(self.spilled / MIB, 1), "samples": self.samples,
                "titles": sorted(self.titles), "errors": self.errors[:3]}


def _anonymous(pid: int) -> int:
    """Bytes of anonymous memory (heap, not files nor shared memory) of process ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:"))
    except (OSError, StopIteration):
        return 0
