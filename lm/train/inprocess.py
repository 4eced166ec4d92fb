"""``train.trainer: local``: the plain single-process loop (lm.train.local) on the prepared data, writing
what the Ray trainer writes (``<run>/train/metrics.jsonl``, ``loss.png`` and the model directory). Called
by :func:`lm.train.trainer.train`, the one entry point for both trainers."""

from __future__ import annotations

from lm.config import Config, join_uri
from lm.data.manifest import read_manifest
from lm.data.stream import train_stream, validation_rows
from lm.modeldir import save_model_dir
from lm.progress import Log
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.distill import lineage as distill_lineage
from lm.train.distill import load_teacher
from lm.train.local import TrainResult, pick_device, train_local
from lm.train.loop import build_model, load_init_weights
from lm.train.metrics import history_jsonl, loss_curve_png


def train_in_process(cfg: Config, store: ObjectStore, log: Log) -> tuple[str, TrainResult]:
    """Train ``cfg`` in this process on ``cfg.data_uri``; publish ``<run>/model``. (model URI, the loop's result)."""
    data = cfg.data_uri
    manifest = read_manifest(store, data)
    tok = BPETokenizer.from_json(store.read_text(manifest.tokenizer_uri(data)))
    val_rows, val_mask = validation_rows(store, data, cfg.train)
    model = build_model(cfg, tok.vocab_size)
    if cfg.train.init_from:
        load_init_weights(model, store, cfg.train.init_from)
    device = pick_device(cfg.train.device)
    log(f"model: {model.num_parameters():,} parameters; training on {device}")
    distill = cfg.train.distill
    teacher = (load_teacher(store, distill.teacher, tok, cfg.seq_len, cfg.train.precision, device)
               if distill.teacher else None)
    result = train_local(cfg, model, train_stream(store, data, cfg.train), val_rows, log=log, val_mask=val_mask,
                         teacher=teacher)
    train_uri = join_uri(cfg.run_uri, "train")
    store.write_text(join_uri(train_uri, "metrics.jsonl"), history_jsonl(result.history))
    store.write_bytes(join_uri(train_uri, "loss.png"), loss_curve_png(result.history, f"{cfg.name}: loss"))
    model_uri = join_uri(cfg.run_uri, "model")
    lineage = {"run": cfg.name, "config_hash": cfg.fingerprint(), "tokenizer_hash": tok.fingerprint(),
               "data_manifest": join_uri(data, "manifest.json"), "data_inputs": manifest.inputs_fingerprint,
               "steps": result.steps, "tokens": result.tokens, "final_loss": result.history[-1]["loss"],
               "trainer": "local"}
    if distilled := distill_lineage(distill):
        lineage["distill"] = distilled
    save_model_dir(store, model_uri, model.cpu(), tok, cfg.generate, lineage)
    return model_uri, result
