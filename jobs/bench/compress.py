"""The compression trade-off table: size on disk, CPU decoding speed and validation bits per byte of a
base model and its compressed variants (int8, pruned, distilled).

    python jobs/bench/compress.py                       # the `make demo` model and its data
    python jobs/bench/compress.py --model URI --distilled URI --finetune-steps 50 --out jobs/bench/results/compress.json

One process, no Ray. From the base model directory (``--model``; default the demo's
./lmforge-store/runs/shakespeare-cpu/model) it makes, under ``--work`` (default ``<run>/compress/``,
reused when already published unless ``--rebuild``):

* ``int8``: lm.serve.quantize.quantize_int8 in memory (dynamic int8 Linear layers; there is no int8
  model-directory format, so its size is that of ``torch.save`` of its state_dict);
* pruned model directories (lm.compress.prune.prune_dir): unstructured at ``--sparsities`` (per-matrix
  magnitude), whole attention heads and SwiGLU channels at ``--structured-sparsity``, each also with
  ``--finetune-steps`` of the plain loop afterwards, plus the unpruned base with the same fine-tune
  (the control: the demo model is under-trained, so extra steps alone also help);
* distilled: ``--distilled URI``, else a student with ``--student-layers`` layers (the base's other
  settings) trained ``--student-steps`` steps with the base as ``train.distill.teacher``
  (lm.train.distill through lm.train.train with train.trainer=local), and the same student trained without a
  teacher (the control).

Columns: parameters; ``model.safetensors`` bytes (dense fp32: unstructured zeros do not shrink it)
and the same file compressed with zstd level 19 (where zeros do count); decoding tokens/s on the CPU
with ``--threads`` torch threads (default 1), batch 1, greedy through lm.serve.engine with
``ignore_eos``: ``--new-tokens`` after each of ``--prompts`` prompts (the first 16 tokens of validation
rows), the median (and best) of ``--repeats`` rounds after a warm-up, every variant once per round in a
shuffled order, so the machine's drift hits them alike; validation bits per byte on the whole val split of the
base's data (lm.eval.metrics.model_sums, as `lm eval` computes it). Writes the JSON (``--out``), a PNG beside it
(size vs bits per byte) and prints a Markdown table for the README. Unless ``--no-large``, the same
decoding timing (2 prompts, 16 + 16 tokens) on a randomly initialised gpt2-124m-shaped model and its
int8 / pruned / 6-layer versions, where FLOPs rather than per-step overhead decide the speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os
import random
import statistics
import time
from pathlib import Path

import torch
import zstandard
from results_io import machine, write_result

from lm.compress.prune import prune_dir, training_data_uri
from lm.config import join_uri, load_config
from lm.data.stream import ParquetSplit, read_head
from lm.eval.metrics import model_sums, token_byte_lengths
from lm.modeldir import load_model_dir
from lm.serve.engine import Engine, GenRequest
from lm.serve.quantize import quantize_int8
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer

DEMO = "./lmforge-store/runs/shakespeare-cpu/model"


def zstd_size(data: bytes) -> int:
    return len(zstandard.ZstdCompressor(level=19).compress(data))


def sizes(store: ObjectStore, uri: str | None, model: torch.nn.Module) -> dict:
    """Bytes of model.safetensors (a directory) or of torch.save(state_dict) (int8), raw and zstd -19."""
    if uri is not None:
        data, what = store.read_bytes(join_uri(uri, "model.safetensors")), "model.safetensors"
    else:
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        data, what = buf.getvalue(), "torch.save(state_dict)"
    return {"file": what, "bytes": len(data), "zstd19_bytes": zstd_size(data)}


def decode_once(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds to decode ``new_tokens`` greedily after each prompt, one request at a time."""
    start = time.perf_counter()
    for p in prompts:
        (done,) = engine.generate([GenRequest(p, new_tokens, temperature=0, ignore_eos=True)])
        assert len(done.token_ids) == new_tokens
    return time.perf_counter() - start


def timings(models: dict[str, torch.nn.Module], tok: BPETokenizer, prompts, new_tokens: int, repeats: int) -> dict:
    """Median and best tokens/s per model: a warm-up each, then ``repeats`` rounds over every model, in a
    new (seeded) order each round, so neither drift in the machine's load nor a position favours one."""
    engines = {name: Engine(m, tok, max_batch_size=1) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        decode_once(engine, prompts[:1], 8)
    order = list(engines)
    for r in range(repeats):
        random.Random(r).shuffle(order)
        for name in order:
            times[name].append(decode_once(engines[name], prompts, new_tokens))
    total = len(prompts) * new_tokens
    return {name: {"tokens_per_s": round(total / statistics.median(t), 1),
                   "tokens_per_s_best": round(total / min(t), 1),
                   "seconds_all": [round(x, 3) for x in t]} for name, t in times.items()}


class _NumbersTokenizer:
    """Enough of BPETokenizer for the engine's bookkeeping on a model without a real vocabulary."""

    eos_id = 0

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


def large_model(args) -> dict:
    """Decoding speed alone on a randomly initialised model of gpt2-124m's shape (12 x 768, vocab 50304),
    where the matrices are big enough for FLOPs to matter: base, int8, pruned, and a 6-layer shape."""
    from lm.compress.prune import prune_model
    from lm.config import ModelConfig
    from lm.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=12, n_heads=12, d_model=768, vocab_size=50304, max_seq_len=1024)
    base = Transformer(cfg).eval()
    models = {"base": base, "int8": quantize_int8(base),
              "unstructured 0.6": prune_model(base, 0.6, "unstructured").model,
              "heads 0.5": prune_model(base, 0.5, "heads").model,
              "channels 0.5": prune_model(base, 0.5, "channels").model,
              "6 layers (a student's shape)": Transformer(cfg.model_copy(update={"n_layers": 6})).eval()}
    prompts = [[(7 * i + j) % 50000 + 1 for j in range(16)] for i in range(2)]
    speed = timings(models, _NumbersTokenizer(), prompts, 16, args.repeats)  # type: ignore[arg-type]
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    params["int8"] = params["base"]
    return {"shape": "gpt2-124m (random weights)", "prompts": len(prompts), "prompt_tokens": 16, "new_tokens": 16,
            "rows": [{"name": name, "parameters": params[name], **speed[name]} for name in models]}


def build_student(args, store: ObjectStore, base: str, data: str, work: str, teacher: bool, log) -> str:
    """Train the small student (with or without the base as teacher) with the plain loop; its model URI."""
    from lm.train.trainer import train

    name = "student-distilled" if teacher else "student-alone"
    out = join_uri(work, name)
    if store.is_published(join_uri(out, "model")) and not args.rebuild:
        return join_uri(out, "model")
    overrides = [f"output={out}", f"data.output={data}", f"model.n_layers={args.student_layers}",
                 "train.trainer=local", "train.device=cpu", f"train.max_steps={args.student_steps}",
                 "train.max_seconds=null", f"train.batch_size={args.student_batch}",
                 f"train.eval_interval={args.student_steps}", *args.overrides]
    if teacher:
        overrides.append(f"train.distill.teacher={base}")
    cfg = load_config(args.config, overrides)
    return train(cfg, store, log, prepare=False).model_uri


def variants(args, store: ObjectStore, base: str, data: str, work: str, log) -> dict[str, dict]:
    """name → {"uri", "kind", "method", "sparsity", "finetune_steps"} for every model directory of the table."""
    ft_cfg = load_config(args.config, ["train.trainer=local", "train.device=cpu", "train.max_seconds=null",
                                       f"train.lr={args.finetune_lr}", f"train.min_lr={args.finetune_lr / 10}",
                                       "train.warmup_steps=5", f"train.batch_size={args.student_batch}",
                                       *args.overrides])
    plan = [("unstructured", s) for s in args.sparsities]
    plan += [("heads", args.structured_sparsity), ("channels", args.structured_sparsity)]
    found: dict[str, dict] = {"base": {"uri": base, "kind": "base"}}
    steps_options = [0, args.finetune_steps] if args.finetune_steps else [0]
    if args.finetune_steps:
        plan.insert(0, ("unstructured", 0.0))  # the control: the base with the same fine-tune
    for method, sparsity in plan:
        for steps in steps_options:
            if sparsity == 0.0 and steps == 0:
                continue
            name = ("base" if sparsity == 0.0 else f"{method} {sparsity:g}") + (f" + {steps} steps" if steps else "")
            uri = join_uri(work, f"{method}-{sparsity:g}-ft{steps}")
            if args.rebuild or not store.is_published(uri):
                prune_dir(store, base, uri, sparsity, method, finetune_steps=steps, cfg=ft_cfg, data_uri=data, log=log)
            found[name] = {"uri": uri, "kind": "pruned", "method": method, "sparsity": sparsity,
                           "finetune_steps": steps}
    if args.distilled:
        found["distilled"] = {"uri": args.distilled, "kind": "distilled (given)"}
    elif importlib.util.find_spec("lm.train.distill") is None:
        log("compress: lm.train.distill is not there yet: no distilled row (pass --distilled URI)")
    else:
        found[f"distilled student ({args.student_layers} layers)"] = {
            "uri": build_student(args, store, base, data, work, True, log), "kind": "distilled"}
        found[f"same student, no teacher ({args.student_layers} layers)"] = {
            "uri": build_student(args, store, base, data, work, False, log), "kind": "student control"}
    return found


def markdown(rows: list[dict], threads: int) -> str:
    head = (f"| variant | parameters | model.safetensors MB | zstd -19 MB | tok/s median (best), CPU, {threads} "
            "thread, batch 1 | val bits/byte | Δ vs base |\n|---|---|---|---|---|---|---|")
    base = rows[0]["val_bpb"]
    lines = [head]
    for r in rows:
        lines.append(f"| {r['name']} | {r['parameters']:,} | {r['size']['bytes'] / 1e6:.2f} | "
                     f"{r['size']['zstd19_bytes'] / 1e6:.2f} | "
                     f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s_best']:,.0f}) | "
                     f"{r['val_bpb']:.4f} | "
                     f"{r['val_bpb'] - base:+.4f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(rows):
        ax.scatter(r["size"]["zstd19_bytes"] / 1e6, r["val_bpb"])
        ax.annotate(r["name"], (r["size"]["zstd19_bytes"] / 1e6, r["val_bpb"]), fontsize=7,
                    xytext=(4, 4 if i % 2 else -10), textcoords="offset points")
    ax.set_xlabel("size on disk, zstd -19 (MB)")
    ax.set_ylabel("validation bits per byte (lower is better)")
    ax.set_title("compression trade-off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEMO, help="the base model directory")
    parser.add_argument("--config", "-c", default="configs/shakespeare-cpu.yaml",
                        help="preset for the fine-tunes and the student (train.*, model.*)")
    parser.add_argument("--data", help="data folder (default: the one the base was trained on)")
    parser.add_argument("--work", help="where the variants go (default: <run>/compress next to <run>/model)")
    parser.add_argument("--distilled", help="a distilled model directory (default: train a student here)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.6])
    parser.add_argument("--structured-sparsity", type=float, default=0.5)
    parser.add_argument("--finetune-steps", type=int, default=50)
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--student-batch", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=8, help="decoded one after another per timing run")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing decoding")
    parser.add_argument("--rebuild", action="store_true", help="rebuild variants that already exist")
    parser.add_argument("--no-large", action="store_true", help="skip the speed check on a gpt2-124m-shaped model")
    parser.add_argument("--out", default="jobs/bench/results/compress.json")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for training")
    args = parser.parse_args()
    store = ObjectStore(load_config(args.config, args.overrides).storage)
    log = print

    base = load_model_dir(store, args.model)
    data = args.data or training_data_uri(store, base.lineage, load_config(args.config, args.overrides))
    work = args.work or join_uri(args.model.rstrip("/").rsplit("/", 1)[0], "compress")
    start = time.perf_counter()
    found = variants(args, store, args.model, data, work, log)
    build_seconds = time.perf_counter() - start

    models = {name: load_model_dir(store, v["uri"]).model for name, v in found.items()}
    models = {"base": models.pop("base"), "int8": quantize_int8(base.model), **models}
    found = {"base": found["base"], "int8": {"uri": None, "kind": "quantized"}, **found}
    val = ParquetSplit.open(store, data, "val")
    rows_val, _ = read_head(val, val.rows)  # the whole validation split: a small one (the bench's corpus)
    table = token_byte_lengths(base.tokenizer, base.model.cfg.vocab_size)
    prompts = [[int(t) for t in row[:16]] for row in rows_val[: args.prompts]]

    torch.set_num_threads(args.threads)
    speed = timings(models, base.tokenizer, prompts, args.new_tokens, args.repeats)
    rows = []
    for name, model in models.items():
        metrics = model_sums(model, rows_val, table, batch_size=16).metrics()
        v = found[name]
        lineage = load_model_dir(store, v["uri"]).lineage if v["uri"] else {}
        rows.append({"name": name, **v, "parameters": sum(p.numel() for p in model.parameters()),
                     "size": sizes(store, v["uri"], model), "tokens_per_s": speed[name]["tokens_per_s"],
                     "tokens_per_s_best": speed[name]["tokens_per_s_best"],
                     "decode_seconds_all": speed[name]["seconds_all"], "val_bpb": round(metrics["bpb"], 4),
                     "val_loss": round(metrics["loss"], 4), "pruning": lineage.get("pruning"),
                     "distill": lineage.get("distill")})
        log(f"{name}: {rows[-1]['val_bpb']:.4f} bpb, {rows[-1]['tokens_per_s']:.0f} tok/s")
    rows[1]["parameters"] = rows[0]["parameters"]  # int8: the same weights (its Linear ones are no nn.Parameters)
    out = Path(args.out)
    plot(rows, out.with_suffix(".png"))
    result = {"benchmark": "compress", "machine": machine(), "torch": torch.__version__, "threads": args.threads,
              "load_average_1m_at_end": round(os.getloadavg()[0], 2), "model": args.model, "data": data,
              "val_rows": len(rows_val), "val_tokens_scored": int(metrics["tokens"]),
              "decode": {"prompts": len(prompts), "prompt_tokens": 16, "new_tokens": args.new_tokens,
                         "batch": 1, "greedy": True, "repeats": args.repeats, "engine": "lm.serve.engine"},
              "finetune_steps": args.finetune_steps, "finetune_lr": args.finetune_lr,
              "student": {"layers": args.student_layers, "steps": args.student_steps, "batch": args.student_batch},
              "build_seconds": round(build_seconds, 1), "rows": rows, "markdown": markdown(rows, args.threads)}
    if not args.no_large:
        result["large_model"] = large_model(args)
    write_result(args.out, result)
    print(result["markdown"])
    for r in result.get("large_model", {}).get("rows", []):
        print(f"gpt2-124m shape, {r['name']}: {r['parameters']:,} parameters, {r['tokens_per_s']:.1f} tok/s "
              f"(best {r['tokens_per_s_best']:.1f})")


if __name__ == "__main__":
    main()
