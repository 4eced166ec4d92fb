"""Benchmark int8 dynamic quantization for CPU serving: generation speed and quality, fp32 vs int8.

    python jobs/bench/quantize.py --model ./lmforge-store/runs/shakespeare-cpu/model \\
        --out jobs/bench/results/quantize.json

One process, no Ray. Loads a model directory (local folder or s3:// through lm.storage), quantizes its
Linear layers with lm.serve.quantize.quantize_int8, then for both models: greedy generation through
lm.serve.engine (the serving path: prefill + KV-cache decoding, ignore_eos so every row makes exactly
--new-tokens tokens) at batch 1 and 8, prompts = the first --prompt-tokens tokens of validation rows,
median tokens/s of --repeats runs after a warm-up, fp32 and int8 runs interleaved; and bits per byte
on the whole validation split of the model's data (lm.eval.metrics, as `lm eval` computes it). Also
records the Linear weight bytes and how many greedy tokens int8 shares with fp32. Unless --no-large, the
same generation timing (16 + 16 tokens) on a randomly initialised model of gpt2-124m's shape, to show
where int8 starts to pay (the demo model's matrices are too small for it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import PurePosixPath

import torch
from results_io import machine, write_result

from lm.config import ModelConfig, StorageConfig
from lm.data.manifest import read_manifest
from lm.data.stream import ParquetSplit, read_head
from lm.eval.metrics import model_sums, token_byte_lengths
from lm.model import Transformer
from lm.modeldir import load_model_dir
from lm.serve.engine import Engine, GenRequest
from lm.serve.quantize import linear_weight_bytes, quantize_int8
from lm.storage import ObjectStore


def data_uri_of(model_uri: str, lineage: dict) -> str:
    """The data folder the model was trained on: lineage's manifest, else <run>/data next to <run>/model."""
    manifest = lineage.get("data_manifest")
    if manifest:
        return str(PurePosixPath(manifest).parent) if "://" not in manifest else manifest.rsplit("/", 1)[0]
    return model_uri.rstrip("/").rsplit("/", 1)[0] + "/data"


def generation_run(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    reqs = [GenRequest(p, new_tokens, temperature=0, ignore_eos=True) for p in prompts]
    start = time.perf_counter()
    out = engine.generate(reqs)
    seconds = time.perf_counter() - start
    assert all(len(c.token_ids) == new_tokens for c in out)
    return seconds, [c.token_ids for c in out]


def timed_generation(engines: dict[str, Engine], prompts: list[list[int]], new_tokens: int, repeats: int,
                     batches: tuple[int, ...] = (1, 8)) -> tuple[dict, dict[str, list[list[int]]]]:
    """Median tokens/s per engine and batch size (a warm-up each, then runs interleaved across engines,
    so drift in the machine's load hits both alike); also the last batch's token ids per engine."""
    generation: dict[str, dict] = {name: {} for name in engines}
    outputs: dict[str, list[list[int]]] = {}
    for batch in batches:
        times: dict[str, list[float]] = {name: [] for name in engines}
        for engine in engines.values():
            generation_run(engine, prompts[:batch], new_tokens)
        for _ in range(repeats):
            for name, engine in engines.items():
                seconds, outputs[name] = generation_run(engine, prompts[:batch], new_tokens)
                times[name].append(seconds)
        for name in engines:
            med = statistics.median(times[name])
            generation[name][f"batch{batch}"] = {
                "tokens_per_s": round(batch * new_tokens / med, 1),
                "seconds_median": round(med, 4),
                "seconds_all": [round(t, 4) for t in times[name]],
            }
    return generation, outputs


def speedup(generation: dict) -> dict[str, float]:
    return {b: round(generation["int8"][b]["tokens_per_s"] / generation["fp32"][b]["tokens_per_s"], 2)
            for b in generation["fp32"]}


def large_model(repeats: int) -> dict:
    """fp32 vs int8 generation on a random model of gpt2-124m's shape (12 x 768, vocab 50304)."""
    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig(n_layers=12, n_heads=12, d_model=768, vocab_size=50304, max_seq_len=1024)).eval()
    int8 = quantize_int8(fp32)
    tok = _DummyTokenizer()
    engines = {"fp32": Engine(fp32, tok), "int8": Engine(int8, tok)}  # type: ignore[arg-type]
    prompts = [[(7 * i + j) % 50000 + 1 for j in range(16)] for i in range(8)]
    generation, _ = timed_generation(engines, prompts, 16, repeats)
    return {"shape": "gpt2-124m (random weights)", "prompt_tokens": 16, "new_tokens": 16,
            "linear_weight_bytes": {"fp32": linear_weight_bytes(fp32), "int8": linear_weight_bytes(int8)},
            "generation": generation, "speedup_int8": speedup(generation)}


class _DummyTokenizer:
    """Enough of BPETokenizer for the engine's bookkeeping on a model without a real vocabulary."""

    eos_id = 0

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="./lmforge-store/runs/shakespeare-cpu/model")
    parser.add_argument("--data", default=None, help="data folder with manifest.json (default: from lineage)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-large", action="store_true", help="skip the gpt2-124m-shaped model")
    parser.add_argument("--out", default="jobs/bench/results/quantize.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    store = ObjectStore(StorageConfig())
    loaded = load_model_dir(store, args.model)
    fp32, tok = loaded.model, loaded.tokenizer
    start = time.perf_counter()
    int8 = quantize_int8(fp32)
    quantize_seconds = time.perf_counter() - start
    models = {"fp32": fp32, "int8": int8}
    engines = {name: Engine(m, tok, max_batch_size=8) for name, m in models.items()}

    data = args.data or data_uri_of(args.model, loaded.lineage)
    manifest = read_manifest(store, data)
    if manifest.tokenizer.hash != tok.fingerprint():
        raise SystemExit(f"{data}: its shards were made with another tokenizer than {args.model}'s")
    val = ParquetSplit.open(store, data, "val")
    rows, _ = read_head(val, val.rows)  # the whole validation split: a small one (the bench's corpus)
    prompts = [[int(t) for t in row[: args.prompt_tokens]] for row in rows[:8]]

    generation, outputs = timed_generation(engines, prompts, args.new_tokens, args.repeats)

    table = token_byte_lengths(tok, fp32.cfg.vocab_size)
    quality = {}
    for name, m in models.items():
        start = time.perf_counter()
        metrics = model_sums(m, rows, table, batch_size=16).metrics()
        quality[name] = {"val_bpb": round(metrics["bpb"], 4), "val_loss": round(metrics["loss"], 4),
                         "val_accuracy": round(metrics["accuracy"], 4),
                         "seconds": round(time.perf_counter() - start, 2)}

    same = sum(a == b for ra, rb in zip(outputs["fp32"], outputs["int8"], strict=True)
               for a, b in zip(ra, rb, strict=True))
    prefix = [next((i for i, (a, b) in enumerate(zip(ra, rb, strict=True)) if a != b), len(ra))
              for ra, rb in zip(outputs["fp32"], outputs["int8"], strict=True)]
    result = {
        "benchmark": "quantize",
        "machine": machine(),
        "torch": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "threads": args.threads,
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "model": args.model,
        "data": data,
        "val_rows": len(rows),
        "val_tokens_scored": int(metrics["tokens"]),
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "repeats": args.repeats,
        "quantize_seconds": round(quantize_seconds, 2),
        "linear_weight_bytes": {name: linear_weight_bytes(m) for name, m in models.items()},
        "generation": generation,
        "speedup_int8": speedup(generation),
        "quality": quality,
        "bpb_change_int8": round(quality["int8"]["val_bpb"] - quality["fp32"]["val_bpb"], 4),
        "greedy_tokens_same_as_fp32": round(same / (8 * args.new_tokens), 3),
        "greedy_identical_prefix_tokens": prefix,
    }
    if not args.no_large:
        result["large_model"] = large_model(args.repeats)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
