"""``train.trainer: local``: the plain single-process loop (lm.train.local) on the prepared data, writing
what the Ray trainer writes (``<run>/train/metrics.jsonl``, ``loss.png`` and the model directory). Called
by :func:`lm.train.trainer.train`, the one entry point for both trainers."""

from __future__ import annotations

from lm.config import Config
from lm.data.manifest import read_manifest
from lm.data.stream import train_stream, validation_rows
from lm.progress import Log
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.distill import load_teacher
from lm.train.local import TrainResult, pick_device, train_local
from lm.train.publish import RunFacts, publish_run
from lm.train.weights import build_model, load_init_weights


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
    facts = RunFacts(tokens=result.tokens, trainer="local")
    return publish_run(store, cfg, model, tok, manifest, result.history, facts), result
