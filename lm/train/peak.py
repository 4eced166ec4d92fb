"""The peak FLOP/s that MFU divides by: one fixed number per device, never a matmul timed mid-run.

    peak = device_peak(torch.device("cpu"), given=cfg.train.peak_flops)   # Peak(flops, source)
    share = peak.flops * cpus_per_worker / os.cpu_count()                 # a CPU worker's part of it

* ``train.peak_flops`` when the config states one (per worker's device);
* a GPU: the dense bf16 peak of its datasheet, found by name (H100 / H200 989 TFLOP/s, A100 312, ...);
* a CPU (or an unlisted GPU): a calibration taken once and cached under the machine's description
  (``~/.cache/lmforge/peak-flops.json``, or ``$LMFORGE_CACHE``): the best of several fp32 2048² matmuls on
  all cores. Later runs on the same machine divide by the same number, whatever else runs beside them;
  calibrate on a quiet machine (``lm train`` does it in the driver, before any worker starts).

Model FLOPs per token are lm.model.flops_per_token's (6·N + attention, PaLM's accounting).
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


@dataclass(frozen=True)
class Peak:
    flops: float  # FLOP/s of one device (a GPU, or all of a machine's CPU cores)
    source: str  # where the number comes from: "train.peak_flops", "datasheet ...", "calibrated ..."


def device_peak(device: torch.device, given: float | None = None) -> Peak:
    """The peak of ``device`` (see the module docstring)."""
    if given:
        return Peak(given, "train.peak_flops")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (tflops := datasheet_tflops(name)) is not None:
            return Peak(tflops * 1e12, f"datasheet dense bf16 ({name})")
    return calibrated_peak(device)


def datasheet_tflops(name: str) -> float | None:
    """The dense bf16 TFLOP/s of a GPU known by (part of) its name; None if not listed."""
    return next((tflops for key, tflops in DENSE_BF16_TFLOPS.items() if key in name), None)


def machine_description(device: torch.device) -> str:
    """What a calibration is valid for: the processor, its logical cores, torch's version."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} | torch {torch.__version__}"
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} | {os.cpu_count()} logical cores | torch {torch.__version__}"


def cache_path() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge")) / "peak-flops.json"


def calibrated_peak(device: torch.device) -> Peak:
    """The cached calibration of this machine, measured (and cached) the first time."""
    path, key = cache_path(), machine_description(device)
    known = json.loads(path.read_text()) if path.exists() else {}
    if key not in known:
        known[key] = measure_matmul_flops(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=2) + "\n")
        tmp.replace(path)
    return Peak(float(known[key]), f"calibrated fp32 matmul, all cores ({path})")


def measure_matmul_flops(device: torch.device, size: int = 2048, repeats: int = 4, trials: int = 5) -> float:
    """FLOP/s of a square fp32 matmul on all of ``device`` (every CPU core), the best of ``trials``."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    try:
        a, b = (torch.randn(size, size, device=device) for _ in range(2))
        a @ b  # warm-up
        best = 0.0
        for _ in range(trials):
            start = time.perf_counter()
            for _ in range(repeats):
                a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(threads)


def worker_share(peak: Peak, device: torch.device, cpus_per_worker: float) -> float:
    """The part of the peak one worker can use: its GPU's, or its CPUs' share of the machine's cores."""
    if device.type == "cuda" or peak.source == "train.peak_flops":
        return peak.flops
    return peak.flops * min(cpus_per_worker / (os.cpu_count() or 1), 1.0)
