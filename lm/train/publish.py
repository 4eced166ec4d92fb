"""Publishing a finished training run, for both trainers (Ray Train + DeepSpeed in lm.train.loop, the plain
loop in lm.train.inprocess): ``<run>/train/metrics.jsonl`` and ``loss.png``, then the model directory
``<run>/model`` (lm.modeldir) with its :class:`Lineage`, the same fields whichever trainer made it, and
``<run>/train/config.json``, the resolved config (secrets masked) whose hash is the lineage's ``config_hash``
(``lm lineage --verify`` recomputes it). The code commit comes from lm.provenance (the workers have no .git).

    uri = publish_run(store, cfg, model, tok, manifest, history, RunFacts(tokens=..., trainer="local"))
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lm.config import Config, join_uri
from lm.data.manifest import BaseManifest
from lm.model import Transformer
from lm.modeldir import save_model_dir
from lm.provenance import code_commit
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer
from lm.train.distill import lineage as distill_lineage
from lm.train.metrics import history_jsonl, loss_curve_png


class RunFacts(BaseModel):
    """What only the trainer knows about its run."""

    model_config = ConfigDict(frozen=True)

    tokens: int  # training tokens over all workers
    trainer: Literal["ray+deepspeed", "local"]
    workers: int = 1
    zero_stage: int | None = None  # DeepSpeed's (None: the plain loop)
    data_position: dict[str, Any] | None = None  # where the stream stopped (lm.data.stream.StreamPosition)


class Lineage(RunFacts):
    """``lineage.json`` of a trained model directory: what made it (lm.modeldir writes it)."""

    run: str
    config_hash: str
    tokenizer_hash: str
    data_manifest: str
    data_inputs: str
    steps: int
    final_loss: float
    val_loss: float | None
    distill: dict[str, Any] | None = None  # train.distill of a distilled run (lm.train.distill.lineage)
    seed: int | None = None  # train.seed
    code_commit: str | None = None  # git commit of the code (lm.provenance; ``-dirty``: uncommitted changes)
    config: str | None = None  # <run>/train/config.json: the resolved config that config_hash hashes


def config_blob(cfg: Config) -> str:
    """The resolved config as :meth:`Config.fingerprint` hashes it (``config.json`` of a run)."""
    return json.dumps(cfg.public_dict(), sort_keys=True)


def publish_run(store: ObjectStore, cfg: Config, model: Transformer, tok: BPETokenizer, manifest: BaseManifest,
                history: list[dict[str, Any]], facts: RunFacts) -> str:
    """Write the run's metrics and loss curve, then publish ``<run>/model``; its URI."""
    train_uri = join_uri(cfg.run_uri, "train")
    store.write_text(join_uri(train_uri, "metrics.jsonl"), history_jsonl(history))
    store.write_bytes(join_uri(train_uri, "loss.png"), loss_curve_png(history, f"{cfg.name}: loss"))
    config_uri = join_uri(train_uri, "config.json")
    store.write_text(config_uri, config_blob(cfg))
    last = history[-1]
    lineage = Lineage(**facts.model_dump(), run=cfg.name, config_hash=cfg.fingerprint(),
                      tokenizer_hash=tok.fingerprint(), data_manifest=join_uri(cfg.data_uri, "manifest.json"),
                      data_inputs=manifest.inputs_fingerprint, steps=last["step"], final_loss=last["loss"],
                      val_loss=last.get("val_loss"), distill=distill_lineage(cfg.train.distill),
                      seed=cfg.train.seed, code_commit=code_commit(), config=config_uri)
    model_uri = join_uri(cfg.run_uri, "model")
    save_model_dir(store, model_uri, model.cpu(), tok, cfg.generate, lineage.model_dump(mode="json", exclude_none=True))
    return model_uri
