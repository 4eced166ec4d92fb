"""The DeepSpeed engine built from our config, in this process (world size 1, gloo): optimizer offload
with DeepSpeedCPUAdam, bf16, and the learning-rate schedule DeepSpeed steps for us."""

import os
import socket

import pytest
import torch

from lm.config import load_config
from lm.model import Transformer
from lm.train.engine import initialize_engine
from lm.train.optim import lr_at

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def process_group():
    import deepspeed
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.mark.parametrize("overrides", [
    ["train.zero_stage=2", "train.offload_optimizer=true"],  # DeepSpeedCPUAdam (JIT-compiled once, cached)
    ["train.zero_stage=1", "train.precision=bf16"],
], ids=["zero2-offload", "zero1-bf16"])
def test_engine_learns_and_follows_the_schedule(process_group, overrides):
    cfg = load_config("configs/tiny.yaml", ["train.workers=1", "train.warmup_steps=3", "train.max_steps=12",
                                            "model.vocab_size=256", *overrides])
    torch.manual_seed(0)
    engine = initialize_engine(Transformer(cfg.model), cfg.train, seq_len=cfg.seq_len, world=1, on_gpu=False)
    if cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        assert isinstance(engine.optimizer.optimizer, DeepSpeedCPUAdam)
    tokens = torch.randint(0, 256, (cfg.train.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    losses, lrs = [], []
    for _ in range(12):  # one fixed batch: the loss must fall
        lrs.append(engine.get_lr()[0])
        _, loss = engine(tokens[:, :-1], tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    assert lrs == pytest.approx([lr_at(s, cfg.train) for s in range(12)], rel=1e-6)
