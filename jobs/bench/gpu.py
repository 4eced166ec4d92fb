"""Benchmark one device's DeepSpeed training step, without Ray, lever by lever: tokens/s, MFU, peak memory.

    python jobs/bench/gpu.py                                   # the GPU plan (every lever), <= 8 min on an H200
    python jobs/bench/gpu.py --small                           # every lever on CPU; GPU-only ones are skipped
    python jobs/bench/gpu.py --variants gpt2-auto,gpt2-liger   # some of them

Each variant is a preset (configs/gpt2-124m.yaml, configs/1b-zero3.yaml) with overrides: the levers are config
fields (train.zero_stage auto, activation_checkpointing, loss_kernel, attention_backend, compile_mode), applied
by the same lm.train code the Ray Train workers run (lm.train.levers, lm.train.engine), fed random tokens on
one worker. Variants run one per process, two at a time on a GPU: one compiles while the other holds the
timing lock, and the median step is reported (a neighbour's first step may overlap one timed step).
MFU = tokens/s x model FLOPs per token (lm.model.flops_per_token: 6N plus attention, recomputation not
counted) / the device's dense bf16 peak (datasheet; lm.train.peak). Writes one JSON per variant, ``gpu.json``
and a table to --out-dir.
Needs only torch, deepspeed, pydantic and pyyaml (no Ray, no data); liger-kernel for loss_kernel liger.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).parents[2]
GPT2, ONE_B = "gpt2-124m", "1b-zero3"
AUTO = ["train.zero_stage=auto", "train.activation_checkpointing=auto", "train.gpu_memory_gb=null"]
# name -> (preset, overrides); in the order they run (the most telling first, should time run out)
PLAN = {
    "gpt2-zero1": (GPT2, ["train.zero_stage=1"]),  # the preset as first measured
    "gpt2-auto": (GPT2, AUTO),
    "gpt2-liger": (GPT2, [*AUTO, "train.loss_kernel=liger"]),
    "gpt2-liger-b64": (GPT2, [*AUTO, "train.loss_kernel=liger", "train.batch_size=64"]),
    "1b-zero3-ckpt": (ONE_B, ["train.zero_stage=3", "train.activation_checkpointing=true",
                              "train.loss_kernel=torch"]),  # the preset as first measured
    "1b-auto-liger": (ONE_B, [*AUTO, "train.loss_kernel=liger"]),
    "gpt2-liger-cudagraphs": (GPT2, [*AUTO, "train.loss_kernel=liger", "train.compile_mode=reduce-overhead"]),
    "gpt2-liger-b64-cudnn": (GPT2, [*AUTO, "train.loss_kernel=liger", "train.batch_size=64",
                                    "train.attention_backend=cudnn"]),
    "gpt2-chunked-b64": (GPT2, [*AUTO, "train.loss_kernel=chunked", "train.batch_size=64"]),
    "1b-auto-liger-b16": (ONE_B, [*AUTO, "train.loss_kernel=liger", "train.batch_size=16"]),
    "gpt2-liger-b128-cudnn": (GPT2, [*AUTO, "train.loss_kernel=liger", "train.batch_size=128",
                                     "train.attention_backend=cudnn"]),
    "gpt2-cudagraphs": (GPT2, [*AUTO, "train.compile_mode=reduce-overhead"]),
    "gpt2-chunked-b64-cudagraphs": (GPT2, [*AUTO, "train.loss_kernel=chunked", "train.batch_size=64",
                                           "train.compile_mode=reduce-overhead"]),
    "1b-auto-chunked": (ONE_B, [*AUTO, "train.loss_kernel=chunked"]),
    "1b-zero1-chunked": (ONE_B, [*AUTO, "train.zero_stage=1", "train.loss_kernel=chunked"]),
    "1b-zero1-chunked-b16": (ONE_B, [*AUTO, "train.zero_stage=1", "train.loss_kernel=chunked", "train.batch_size=16"]),
    "1b-zero3": (ONE_B, ["train.activation_checkpointing=false"]),
    "1b-ckpt": (ONE_B, ["train.zero_stage=0"]),
    "1b-auto": (ONE_B, AUTO),
    "gpt2-eager": (GPT2, [*AUTO, "train.compile=false"]),
    "gpt2-muon": (GPT2, [*AUTO, "train.optimizer=muon"]),
    "gpt2-flash-math": (GPT2, [*AUTO, "train.attention_backend=math"]),
}
SMALL = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.n_kv_heads=null", "model.d_ff=256",
         "model.max_seq_len=128", "data.seq_len=null", "model.vocab_size=2048", "train.batch_size=4",
         "train.compile=false", "train.precision=bf16"]
SMALL_PLAN = ["gpt2-auto", "gpt2-chunked-b64", "1b-zero3-ckpt", "gpt2-flash-math", "gpt2-muon", "gpt2-liger",
              "gpt2-liger-cudagraphs", "gpt2-liger-b64-cudnn", "small-compiled"]
GPU_ONLY = {"train.loss_kernel=liger": "liger (Triton)", "train.compile_mode=reduce-overhead": "CUDA graphs",
            "train.attention_backend=cudnn": "cuDNN attention"}


def variant_overrides(name: str, small: bool, extra: list[str]) -> tuple[str, list[str]]:
    """The preset file and overrides of variant ``name`` (``--small``: the 2-layer model on CPU), then ``extra``."""
    base = ["train.workers=1", "train.global_batch_tokens=null", "train.compile=true"]
    if name == "small-compiled":
        return str(REPO / f"configs/{GPT2}.yaml"), [*base, *SMALL, *AUTO, "train.compile=true", *extra]
    preset, overrides = PLAN[name]
    return str(REPO / f"configs/{preset}.yaml"), [*base, *(SMALL if small else []), *overrides, *extra]


def attention_kernels(step, on_gpu: bool) -> list[str]:
    """The attention kernels one profiled step ran (what SDPA picked: flash, cuDNN, efficient or math)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        step()
    words = ("flash", "fmha", "cudnn", "attention", "scaled_dot_product")
    return sorted({e.key for e in prof.key_averages() if any(w in e.key.lower() for w in words)})[:6]


def run_one(name: str, small: bool, steps: int, lock: str, extra: list[str]) -> dict:
    """Variant ``name`` in this process: build, compile (first step), take the timing lock, time ``steps``."""
    import torch

    from lm.config import load_config
    from lm.model import Transformer, flops_per_token, num_params
    from lm.train.peak import device_peak

    on_gpu = torch.cuda.is_available()
    config, overrides = variant_overrides(name, small, extra)
    gpu_only = [why for key, why in GPU_ONLY.items() if key in overrides]
    if gpu_only and not on_gpu:
        return {"variant": name, "skipped": f"GPU only: {', '.join(gpu_only)}"}
    cfg = load_config(config, [*overrides, f"train.gpus_per_worker={1 if on_gpu else 0}"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cuda" if on_gpu else "cpu")
    import deepspeed

    from lm.train.engine import initialize_engine
    from lm.train.levers import checkpoint_blocks, prepare_levers

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    cfg, plan = prepare_levers(cfg, 1, device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    checkpoint_blocks(model, plan.recomputed)
    engine = initialize_engine(model, cfg.train, seq_len=cfg.seq_len, world=1, on_gpu=on_gpu)
    B, T = cfg.train.batch_size, cfg.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        _, loss = engine(x, y, loss_kernel=cfg.train.loss_kernel)
        engine.backward(loss)
        engine.step()
        return loss.item()

    started = time.perf_counter()
    losses = [step()]  # compiles
    compile_s = time.perf_counter() - started
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the device is this variant's alone from here
        losses += [step() for _ in range(2)]
        if on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):  # each step ends in loss.item(): the device is done with it
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
        kernels = attention_kernels(step, on_gpu)
    seconds = statistics.median(times)  # the median step: one step a compiling neighbour touched does not count
    peak = device_peak(device, None)
    tokens_per_s = B * T / seconds
    if on_gpu:
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import psutil

        memory = psutil.Process().memory_info().rss / 2**30
    tc = cfg.train
    return {
        "variant": name, "device": torch.cuda.get_device_name(device) if on_gpu else "CPU", "config": Path(config).name,
        "small": small, "params_m": round(num_params(cfg.model) / 1e6, 1), "batch_size": B, "seq_len": T,
        "zero_stage": tc.zero_stage, "recomputed_blocks": plan.recomputed, "n_layers": cfg.model.n_layers,
        "compile": tc.compile, "compile_mode": tc.compile_mode, "loss_kernel": tc.loss_kernel,
        "attention_backend": tc.attention_backend, "attention_kernels": kernels, "optimizer": tc.optimizer,
        "precision": tc.precision, "first_step_s": round(compile_s, 1), "step_ms": round(seconds * 1000, 1),
        "tokens_per_s": round(tokens_per_s), "mfu": round(tokens_per_s * flops_per_token(cfg.model, T) / peak.flops, 4),
        "peak_tflops": round(peak.flops / 1e12, 1), "peak_source": peak.source,
        "peak_memory_gib": round(memory, 2), "memory_plan": plan.describe(cfg.model.n_layers),
        "losses": [round(v, 4) for v in losses], "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }


def launch(name: str, args: argparse.Namespace, deadline: float) -> dict:
    """Variant ``name`` in a fresh process (its own CUDA context, compile caches and process group)."""
    left = deadline - time.monotonic()
    if left < 30:
        return {"variant": name, "skipped": "out of time"}
    out = Path(args.out_dir) / f"{name}.json"
    command = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--out-dir", args.out_dir,
               *(["--small"] if args.small else []), *args.overrides]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    except subprocess.TimeoutExpired:
        return {"variant": name, "failed": "timed out (the run's time limit)"}
    if done.returncode != 0 or not out.exists():
        lines = (done.stdout + done.stderr).strip().splitlines()
        (Path(args.out_dir) / f"{name}.log").write_text("\n".join(lines[-300:]) + "\n")
        errors = [line.removeprefix("[rank0]: ") for line in lines if "Error" in line][-1:]
        return {"variant": name, "failed": (errors or lines[-1:] or ["no output"])[0][-200:]}
    return json.loads(out.read_text())


def table(results: list[dict]) -> str:
    rows = [("| variant | ZeRO | recomputed | loss kernel | attention | batch | tokens/s | MFU | memory GiB | "
             "first step s |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "mfu" not in r or "invalid" in r:
            why = r.get("skipped") or r.get("failed") or r.get("invalid")
            rows.append(f"| {r['variant']} | {why} |||||||||")
            continue
        kernel = ", ".join(k for k in r["attention_kernels"] if "backward" not in k.lower())[:60]
        rows.append(f"| {r['variant']} | {r['zero_stage']} | {r['recomputed_blocks']}/{r['n_layers']} | "
                    f"{r['loss_kernel']} | {r['attention_backend']}: {kernel} | {r['batch_size']} | "
                    f"{r['tokens_per_s']:,} | **{r['mfu']:.1%}** | {r['peak_memory_gib']} | {r['first_step_s']} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=None, help="comma-separated names (default: the whole plan)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 untimed ones)")
    parser.add_argument("--small", action="store_true", help="the 2-layer model on CPU (a smoke run of every lever)")
    parser.add_argument("--minutes", type=float, default=7.5, help="the whole run's limit (variants not started "
                        "by then are listed as skipped)")
    parser.add_argument("--parallel", type=int, default=None, help="variants at once (default: 2 on GPU, 1 on CPU)")
    parser.add_argument("--out-dir", default=str(REPO / "jobs/bench/results/gpu"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="config overrides for every variant, e.g. train.lr=0.001")
    args = parser.parse_args()
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    if args.one:
        result = run_one(args.one, args.small, args.steps, str(Path(args.out_dir) / ".timing-lock"), args.overrides)
        (Path(args.out_dir) / f"{args.one}.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    names = args.variants.split(",") if args.variants else SMALL_PLAN if args.small else list(PLAN)
    import torch

    parallel = args.parallel or (2 if torch.cuda.is_available() else 1)
    deadline = time.monotonic() + args.minutes * 60
    with ThreadPoolExecutor(parallel) as pool:
        results = []
        for result in pool.map(lambda n: launch(n, args, deadline), names):
            results.append(result)
            print(json.dumps({k: result.get(k) for k in ("variant", "mfu", "tokens_per_s", "skipped", "failed")}),
                  flush=True)
    summary = {"results": results, "table": table(results)}
    (Path(args.out_dir) / "gpu.json").write_text(json.dumps(summary, indent=2) + "\n")
    (Path(args.out_dir) / "table.md").write_text(summary["table"])
    print(summary["table"])


if __name__ == "__main__":
    main()
