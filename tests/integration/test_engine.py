"""The DeepSpeed engine built from our config, in this process (world size 1, gloo): optimizer offload
with DeepSpeedCPUAdam, bf16, and the learning-rate schedule DeepSpeed steps for us."""

import os
import socket

import pytest
import torch

from lm.config import load_config
from lm.model import Transformer
from lm.train.engine import initialize_engine
from lm.train.optim import lr_at, lr_scale

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


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's reference orthogonalisation (Keller Jordan's quintic Newton-Schulz iteration), in float64: the
    direction a Muon step takes for a gradient ``g`` (first step: no momentum yet)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double() / (g.double().norm() + 1e-7)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).float()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_muon_orthogonalises_the_hidden_matrices_and_adamw_the_rest(process_group, stage):
    """train.optimizer=muon under ZeRO 0-2: one step moves every hidden matrix along the orthogonalised gradient
    (U V^T of its SVD, which Newton-Schulz approximates), not along the gradient (SGD) nor its sign (Adam's
    first step); the embeddings take AdamW's step (sign of the gradient, lr); each group follows the schedule
    from its own peak."""
    cfg = load_config("configs/tiny.yaml", ["train.workers=1", "train.warmup_steps=0", "train.max_steps=12",
                                            "model.vocab_size=256", "train.optimizer=muon", f"train.zero_stage={stage}",
                                            "train.weight_decay=0", "train.grad_clip=0"])
    torch.manual_seed(0)
    engine = initialize_engine(Transformer(cfg.model), cfg.train, seq_len=cfg.seq_len, world=1, on_gpu=False)
    params = dict(engine.module.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    tokens = torch.randint(0, 256, (cfg.train.batch_size, cfg.seq_len + 1), generator=torch.Generator().manual_seed(1))
    reference = Transformer(cfg.model)  # the gradient, from a plain copy (ZeRO 1-2 keep theirs in partitions)
    reference.load_state_dict(engine.module.state_dict())
    reference(tokens[:, :-1], tokens[:, 1:])[1].backward()
    grads = {name: p.grad for name, p in reference.named_parameters()}
    _, loss = engine(tokens[:, :-1], tokens[:, 1:])
    engine.backward(loss)
    engine.step()

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a * b).sum() / (a.norm() * b.norm()))

    hidden = [n for n, p in params.items() if p.dim() == 2 and "embed" not in n]
    assert len(hidden) == 7 * cfg.model.n_layers  # q, k, v, o, gate, up, down per block
    along = {"muon": [], "sgd": [], "adam": []}  # cosine of each direction with Newton-Schulz's, per matrix
    for name in hidden:
        orthogonal = newton_schulz(grads[name])
        along["muon"].append(cos(before[name] - params[name].detach(), orthogonal))
        along["sgd"].append(cos(grads[name], orthogonal))
        along["adam"].append(cos(grads[name].sign(), orthogonal))
    assert min(along["muon"]) > 0.98, along["muon"]
    assert max(along["sgd"]) < 0.95 and max(along["adam"]) < 0.95  # the check would catch either fallback
    embed = "model.embed_tokens.weight"
    step = before[embed] - params[embed].detach()
    used = grads[embed].abs().sum(1) > 0  # rows of tokens in the batch
    assert cos(step[used], grads[embed][used].sign()) > 0.99
    assert float(step.abs().max()) == pytest.approx(cfg.train.lr, rel=1e-3)  # Adam's first step: lr x sign
    scale = lr_scale(1, cfg.train)
    for group in engine.optimizer.param_groups:
        peak = cfg.train.muon_lr if group["use_muon"] else cfg.train.lr
        assert group["lr"] == pytest.approx(peak * scale, rel=1e-6), group["name"]
