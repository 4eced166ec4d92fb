"""Run by test_train_ray as a script: resume one checkpoint the way a Ray Train worker does (lm.train.resume,
real DeepSpeed, one gloo process), then write the Adam moments the engine holds, flat per parameter, to a
safetensors file, with each parameter group's settings (lr, betas, eps, weight decay) as its metadata.
Usage: ``resume_probe.py SPEC_JSON`` with keys config, overrides, folder, uri, out."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

SETTINGS = ("lr", "betas", "eps", "weight_decay")  # each optimizer parameter group's, written as metadata


def main(spec: dict) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      DS_ACCELERATOR="cpu")
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state
    from safetensors.torch import save_file

    from lm.config import load_config
    from lm.storage import ObjectStore
    from lm.train.engine import initialize_engine
    from lm.train.resume import Resume, TrainerState, restore
    from lm.train.weights import build_model

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(spec["config"], spec["overrides"])
    folder = Path(spec["folder"])
    source = Resume(folder=folder, uri=spec["uri"], state=TrainerState.read(folder), world=1,
                    zero_stage=cfg.train.zero_stage)
    engine = initialize_engine(build_model(cfg, cfg.model.vocab_size), cfg.train, seq_len=cfg.seq_len, world=1,
                               on_gpu=False, universal=source.mode == "universal")
    restore(engine, source, ObjectStore(cfg.storage), rank=0)
    moments = {f"{name}.{key}": safe_get_full_optimizer_state(param, key).flatten().contiguous()
               for name, param in engine.module.named_parameters() for key in ("exp_avg", "exp_avg_sq")}
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items() if k in SETTINGS}
              for group in engine.optimizer.param_groups]
    save_file(moments, spec["out"], metadata={"groups": json.dumps(groups)})


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
