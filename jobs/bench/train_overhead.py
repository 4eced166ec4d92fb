"""Benchmark the distributed trainer's overhead: tokens/s of `lm train` (Ray Train + DeepSpeed, one
worker) against the plain single-process PyTorch loop (lm.train.local) on the same model, batch and
threads, in the same run.

    python jobs/bench/train_overhead.py --steps 150 --out jobs/bench/results/train_overhead.json

Steady-state throughput: the median tokens/s of the log intervals after the first (start-up, the
DeepSpeed engine and the first report excluded). Target: ratio >= 0.95.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from results_io import machine, write_result

from lm.config import load_config
from lm.data.pipeline import prepare_data
from lm.data.stream import train_stream
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.local import train_local
from lm.train.trainer import train
from lm.train.weights import build_model

REPO = Path(__file__).parents[2]


def steady_tokens_per_s(history: list[dict]) -> float:
    return statistics.median(r["tokens_per_s"] for r in history[2:] if "tokens_per_s" in r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the worker and of the plain loop")
    parser.add_argument("--out", default="jobs/bench/results/train_overhead.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.zero_stage=0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lm-bench-") as tmp:
        cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", [
            f"storage.root={tmp}", "train.workers=1", f"train.cpus_per_worker={args.threads}", "train.batch_size=16",
            f"train.max_steps={args.steps}", f"train.eval_interval={args.steps}", "train.log_interval=10",
            "train.max_seconds=null", "train.optimizer=adamw", "train.schedule=cosine", "train.zero_stage=2",
            *args.overrides])  # the recipe of the results recorded (AdamW, ZeRO-2), whatever the demo's is now
        prepare_data(cfg, log=lambda _: None)
        ray_run = train(cfg)
        store = ObjectStore(cfg.storage)
        tok = BPETokenizer.from_json(store.read_text(f"{cfg.data_uri}/tokenizer.json"))
        torch.set_num_threads(args.threads)
        local_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"device": "cpu"})})
        plain = train_local(local_cfg, build_model(cfg, tok.vocab_size), train_stream(store, cfg.data_uri, cfg.train),
                            None, log=lambda _: None)
    ray_tps, plain_tps = steady_tokens_per_s(ray_run.history), steady_tokens_per_s(plain.history)
    result = {
        "machine": machine(),
        "model": cfg.model.model_dump(), "batch_size": 16, "seq_len": cfg.seq_len, "steps": args.steps,
        "threads": args.threads, "zero_stage": cfg.train.zero_stage, "precision": cfg.train.precision,
        "lm_train_tokens_per_s": round(ray_tps), "plain_loop_tokens_per_s": round(plain_tps),
        "ratio": round(ray_tps / plain_tps, 3),
        "lm_train_wall_s": round(ray_run.seconds, 1), "plain_loop_wall_s": round(plain.seconds, 1),
        "final_loss": {"lm_train": round(ray_run.history[-1]["loss"], 4), "plain": round(plain.history[-1]["loss"], 4)},
        "overrides": args.overrides,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
