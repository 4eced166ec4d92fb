"""Benchmark fp32 against bf16 training on this machine: which reaches a given loss sooner.

    python jobs/bench/precision.py --seconds 60 --out jobs/bench/results/precision.json

One process, no Ray: the demo's model (configs/shakespeare-cpu.yaml) in the DeepSpeed engine of
lm.train.engine (ZeRO-1, world size 1), on tinyshakespeare tokenized and packed by the pure pieces of
lm.data, the same batches for both precisions. Each trains for --seconds; the JSON records steps,
tokens/s, the loss curve and the seconds each needed to reach the best loss the slower one reached.
"""

from __future__ import annotations

import argparse
import gzip
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from results_io import machine, write_result

from lm.config import load_config
from lm.data.pack import pack_rows, rows_to_inputs_targets
from lm.data.stream import ArraySplit, RowStream
from lm.model import Transformer
from lm.tokenizer import train_tokenizer
from lm.train.engine import initialize_engine

REPO = Path(__file__).parents[2]


def packed_rows(cfg) -> np.ndarray:
    text = gzip.decompress((REPO / "lm/corpora/tinyshakespeare.txt.gz").read_bytes()).decode()
    docs = [d for d in text.split("\n\n") if d.strip()]
    tok = train_tokenizer(iter(docs), cfg.tokenizer)
    rows, _ = pack_rows((np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(docs)), cfg.seq_len, tok.eos_id)
    return rows


def run(cfg, rows: np.ndarray, precision: str, seconds: float) -> dict:
    tc = cfg.train.model_copy(update={"precision": precision, "workers": 1, "zero_stage": 1, "optimizer": "adamw",
                                      "max_steps": 100_000, "warmup_steps": 30})
    torch.manual_seed(0)
    engine = initialize_engine(Transformer(cfg.model), tc, seq_len=cfg.seq_len, world=1, on_gpu=False)
    curve, start, step = [], time.perf_counter(), 0
    with RowStream(ArraySplit(rows), tc.seed, 0, 1, tc.shuffle_window_rows) as stream:
        while time.perf_counter() - start < seconds:
            x, y = rows_to_inputs_targets(torch.from_numpy(stream.next_rows(tc.batch_size)[0].astype(np.int64)))
            _, loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            step += 1
            curve.append((time.perf_counter() - start, loss.item()))
    tokens = step * tc.batch_size * cfg.seq_len
    return {"steps": step, "tokens_per_s": round(tokens / curve[-1][0]), "curve": curve}


def seconds_to(curve: list[tuple[float, float]], loss: float, window: int = 10) -> float | None:
    """When the moving average of the loss (over ``window`` steps) first reaches ``loss``."""
    values = np.convolve([v for _, v in curve], np.ones(window) / window, mode="valid")
    hit = np.flatnonzero(values <= loss)
    return round(curve[hit[0] + window - 1][0], 1) if hit.size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="jobs/bench/results/precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(REPO / "configs/shakespeare-cpu.yaml", ["train.batch_size=16"])
    rows = packed_rows(cfg)
    runs = {p: run(cfg, rows, p, args.seconds) for p in ("fp32", "bf16")}
    window = 10
    reachable = max(min(np.convolve([v for _, v in r["curve"]], np.ones(window) / window, mode="valid"))
                    for r in runs.values())
    result = {"machine": machine(), "seconds_each": args.seconds, "threads": args.threads,
              "model": {k: cfg.model.model_dump()[k] for k in ("n_layers", "d_model", "max_seq_len")},
              "target_loss": round(float(reachable), 4)}
    for precision, r in runs.items():
        result[precision] = {"steps": r["steps"], "tokens_per_s": r["tokens_per_s"],
                             "final_loss_avg10": round(float(np.mean([v for _, v in r["curve"][-10:]])), 4),
                             "seconds_to_target": seconds_to(r["curve"], reachable, window)}
    fp32, bf16 = result["fp32"]["seconds_to_target"], result["bf16"]["seconds_to_target"]
    result["faster"] = "fp32" if (fp32 or 1e9) <= (bf16 or 1e9) else "bf16"
    write_result(args.out, result)


if __name__ == "__main__":
    main()
