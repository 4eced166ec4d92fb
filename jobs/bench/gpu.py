"""Benchmark one device's DeepSpeed training step, without Ray: tokens/s, MFU and peak memory.

    python jobs/bench/gpu.py --out jobs/bench/results/gpu.json                # gpt2-124m, bf16, on a GPU
    python jobs/bench/gpu.py --small --steps 4 --out /tmp/gpu-cpu.json        # a CPU smoke run

The model, batch, ZeRO stage and precision come from ``configs/gpt2-124m.yaml`` (one worker, no
accumulation); the step is lm.train.engine's (the same engine the Ray Train workers build), fed random
tokens. MFU = tokens/s x training FLOPs per token (lm.model.flops_per_token) / the device's peak:
--peak-tflops, else a known dense bf16 peak for the GPU's name, else the machine's cached calibration
(lm.train.peak). Target on an
H100: MFU >= 50%. Needs only torch, deepspeed, pydantic and pyyaml (no Ray, no data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time
from pathlib import Path

import torch

from lm.config import load_config
from lm.model import Transformer, flops_per_token, num_params
from lm.train.peak import device_peak

REPO = Path(__file__).parents[2]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs/gpt2-124m.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--small", action="store_true", help="a 2-layer model and short rows (CPU smoke run)")
    parser.add_argument("--compile", action="store_true", help="train.compile=true: torch.compile through the engine")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--out", default="jobs/bench/results/gpu.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=32")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    small = ["model.n_layers=2", "model.d_model=128", "model.n_heads=4", "model.d_ff=256", "model.max_seq_len=128",
             "model.vocab_size=2048", "train.batch_size=4"] if args.small else []
    cfg = load_config(args.config, [*small, "train.workers=1", "train.global_batch_tokens=null",
                                    f"train.gpus_per_worker={1 if on_gpu else 0}",
                                    *([] if on_gpu else ["train.precision=bf16"]),
                                    *(["train.compile=true"] if args.compile else []), *args.overrides])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if on_gpu else "cpu")
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)
    import deepspeed

    from lm.train.engine import initialize_engine

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    engine = initialize_engine(model, cfg.train, seq_len=cfg.seq_len, world=1, on_gpu=on_gpu)
    B, T = cfg.train.batch_size, cfg.seq_len
    tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> float:
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss.item()

    losses = [step() for _ in range(3)]
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if on_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    known = device_peak(device, args.peak_tflops * 1e12 if args.peak_tflops else None)  # lm.train.peak
    peak, peak_source = known.flops, known.source
    tokens_per_s = B * T * args.steps / seconds
    if on_gpu:
        memory = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        import psutil

        memory = psutil.Process().memory_info().rss / 2**30
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"CPU {platform.processor() or platform.machine()}",
        "config": Path(args.config).name, "small": args.small, "compile": cfg.train.compile,
        "activation_checkpointing": cfg.train.activation_checkpointing,
        "params_m": round(num_params(cfg.model) / 1e6, 1), "batch_size": B, "seq_len": T,
        "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
        "step_ms": round(seconds / args.steps * 1000, 1), "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops_per_token(cfg.model, T) / peak, 4),
        "peak_tflops": round(peak / 1e12, 1), "peak_source": peak_source,
        "peak_memory_gib": round(memory, 2), "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)],
        "torch": torch.__version__, "deepspeed": deepspeed.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
