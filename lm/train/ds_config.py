"""The DeepSpeed config generated from ours, and an on-paper memory estimate per GPU.

    ds = deepspeed_config(cfg.train, seq_len=cfg.seq_len, world=2, on_gpu=False)   # for deepspeed.initialize
    estimate = memory_estimate(cfg, gpus=8)                               # bytes per GPU, by part

Pure: no DeepSpeed import, so it is unit-tested without Ray and printable with ``lm config show``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lm.config import Config, TrainConfig
from lm.head_loss import CHUNK_ROWS
from lm.model import num_params


def deepspeed_config(tc: TrainConfig, *, seq_len: int, world: int, on_gpu: bool, universal: bool = False) -> dict:
    """ZeRO stage and offload, precision, micro-batch and accumulation, clipping, the optimizer.

    The optimizer is DeepSpeed's: DeepSpeedCPUAdam when the optimizer state is offloaded, else
    ``torch.optim.AdamW`` (``torch_adam``), so no op needs compiling for a plain CPU or GPU run; or its
    Muon (``train.optimizer: muon``, :func:`_optimizer`). The
    learning rate follows our schedule (lm.train.optim.lr_at), given to DeepSpeed as a scheduler.
    ``universal``: the engine's ``load_checkpoint`` reads a universal checkpoint (a resume on another
    number of workers, lm.train.resume).
    """
    if tc.precision == "fp16" and not on_gpu:
        raise ValueError("precision fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
    accum = tc.grad_accum(seq_len, world)
    zero: dict = {"stage": tc.zero_stage}
    if tc.zero_stage >= 1 and tc.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # a consolidated state dict on save
        if tc.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config: dict = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": tc.batch_size * accum * world,
        "gradient_clipping": tc.grad_clip,
        "zero_optimization": zero,
        "optimizer": _optimizer(tc, on_gpu),
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    if tc.precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif tc.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _optimizer(tc: TrainConfig, on_gpu: bool) -> dict:
    """AdamW (DeepSpeedCPUAdam when offloaded, else torch's), or DeepSpeed's Muon: Newton-Schulz on the
    parameters it tags as hidden matrices (2-D, not embeddings or head), its inline AdamW on the rest."""
    adam = {"lr": tc.lr, "betas": [tc.beta1, tc.beta2], "eps": 1e-8, "weight_decay": tc.weight_decay}
    if tc.optimizer == "muon":
        return {"type": "Muon", "params": {**adam, "muon_lr": tc.muon_lr, "adam_lr": tc.lr,
                                           "momentum": tc.muon_momentum}}
    return {"type": "AdamW", "params": {**adam, **({} if tc.offload_optimizer else {"torch_adam": True}),
                                        **({"fused": True} if on_gpu and not tc.offload_optimizer else {})}}


@dataclass
class MemoryEstimate:
    """Bytes per GPU for one training step, by part (mixed precision: fp32 master weights + Adam)."""

    params: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations

    def as_dict(self) -> dict[str, float]:
        return {**{k: round(v / 2**30, 2) for k, v in asdict(self).items()}, "total": round(self.total / 2**30, 2)}


def memory_estimate(cfg: Config, gpus: int) -> MemoryEstimate:
    """On-paper memory per GPU (ZeRO paper's accounting): weights in the compute dtype (2 bytes for
    bf16/fp16, 4 for fp32), gradients likewise, optimizer state 12 bytes per parameter (fp32 master,
    Adam m and v; 8 when training in fp32) partitioned over ``gpus`` by ZeRO stage (1: optimizer,
    2: + gradients, 3: + weights; offloaded parts cost no GPU memory), plus activations of one
    micro-batch (about 34·s·b·d bytes per layer in half precision per Korthikanti et al.; the 5·a·s²·b
    of attention scores is not stored because SDPA's flash kernel recomputes them; 2·s·b·d per layer
    with activation checkpointing) and the fp32 logits."""
    tc, mc = cfg.train, cfg.model
    n = num_params(mc)
    width = 4 if tc.precision == "fp32" else 2
    opt = (8 if tc.precision == "fp32" else 12) * n
    stage = tc.zero_stage
    params, grads = width * n, width * n
    if stage >= 1:
        opt //= gpus
    if stage >= 2:
        grads //= gpus
    if stage >= 3:
        params //= gpus
    if tc.offload_optimizer:
        opt = 0
    if tc.offload_params:
        params = 0
    s, b, d = cfg.seq_len, tc.batch_size, mc.d_model
    recomputed = recomputed_blocks(tc.activation_checkpointing, mc.n_layers)
    per_block = 2 * s * b * d * recomputed + 34 * s * b * d * (mc.n_layers - recomputed)
    logits = 4 * s * b * mc.vocab_size if tc.loss_kernel == "torch" else 4 * min(s * b, CHUNK_ROWS) * mc.vocab_size
    activations = int(per_block * (width / 2)) + logits  # + the fp32 logits (a chunk of them: lm.head_loss)
    return MemoryEstimate(params, grads, opt, activations)


def recomputed_blocks(setting: bool | int | str, n_layers: int) -> int:
    """How many blocks ``train.activation_checkpointing`` recomputes (``auto`` must be resolved first)."""
    if setting == "auto":
        raise ValueError("activation_checkpointing auto is resolved by fit_memory before use")
    return n_layers if setting is True else min(int(setting), n_layers)


@dataclass
class MemoryPlan:
    """What :func:`fit_memory` chose, and the estimate it fits."""

    zero_stage: int
    recomputed: int  # blocks
    estimate: MemoryEstimate
    budget_gb: float | None

    def describe(self, n_layers: int) -> str:
        budget = f" of {self.budget_gb:g} GiB" if self.budget_gb else ""
        return (f"ZeRO-{self.zero_stage}, {self.recomputed}/{n_layers} blocks recomputed "
                f"({self.estimate.total / 2**30:.1f} GiB on paper{budget})")


HEADROOM = 0.9  # of the device's memory a plan may fill on paper (the estimate is rough: see docs/training.md)


def fit_memory(cfg: Config, world: int, memory_gb: float | None) -> tuple[Config, MemoryPlan]:
    """``cfg`` with ``zero_stage: auto`` and ``activation_checkpointing: auto`` resolved to fit ``memory_gb``
    per device (``train.gpu_memory_gb`` takes precedence; None: no limit) on paper. The cheapest choice
    first: no recomputation at the lowest ZeRO stage, then one more recomputed block at a time. The stages
    tried: 1, 2, 3 on several workers; on one worker, where partitioning saves nothing, 0 in fp32 and 1 in
    bf16 / fp16 (DeepSpeed's ZeRO-0 half-precision optimizer takes other first steps than ZeRO 1-3 and fp32
    do: tests/unit/test_levers.py). Nothing that fits: a ValueError naming it."""
    tc, n = cfg.train, cfg.model.n_layers
    budget = tc.gpu_memory_gb or memory_gb
    if tc.zero_stage != "auto":
        stages = [tc.zero_stage]
    elif tc.optimizer == "muon" and tc.grad_clip > 0:  # under ZeRO >= 1 DeepSpeed would clip Muon's update
        stages = [0]
    elif world == 1:
        stages = [0 if tc.precision == "fp32" else 1]
    else:
        stages = [1, 2, 3]
    blocks = (range(n + 1) if tc.activation_checkpointing == "auto"
              else [recomputed_blocks(tc.activation_checkpointing, n)])
    estimate = None
    for recomputed in blocks:
        for stage in stages:
            resolved = {"zero_stage": stage, "activation_checkpointing": recomputed if recomputed < n else True}
            chosen = cfg.model_copy(update={"train": tc.model_copy(  # only the autos change (the run's config hash)
                update={k: v for k, v in resolved.items() if getattr(tc, k) == "auto"})})
            estimate = memory_estimate(chosen, gpus=world)
            if budget is None or estimate.total <= HEADROOM * budget * 2**30:
                return chosen, MemoryPlan(stage, recomputed, estimate, budget)
    if tc.zero_stage != "auto" and tc.activation_checkpointing != "auto":
        return cfg, MemoryPlan(stages[0], blocks[0], estimate, budget)  # as configured: a stated choice
    raise ValueError(f"train: no ZeRO stage ({stages}) and activation checkpointing fits a step in {budget:g} GiB "
                     f"per device (at best {estimate.total / 2**30:.1f} GiB on paper): lower train.batch_size, "
                     "or set train.zero_stage with offload_optimizer / offload_params")
