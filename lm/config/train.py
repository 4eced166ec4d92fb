"""The ``train`` section: optimizer and schedule (every loop) and the Ray Train + DeepSpeed run."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from lm.config.base import PATH, Section


class DistillConfig(Section):
    """Knowledge distillation (lm.train.distill): learn from a teacher model's logits as well as the data."""

    teacher: Annotated[str | None, PATH] = Field(
        None, description="Teacher model directory (URI) whose logits the student learns from; it must use the "
        "data's tokenizer and hold a context >= the training sequence length. null = no distillation.",
    )
    temperature: float = Field(
        1.0, gt=0, description="Softmax temperature T of teacher and student in the KL term (scaled by T^2). "
        "1 suited lmforge's small models: T = 2 or 4 left the student worse than training without a teacher.",
    )
    weight: float = Field(
        0.5, ge=0, le=1, description="Share w of the KL term: loss = (1 - w) x cross-entropy + w x T^2 x "
        "KL(teacher || student), over the positions that carry a loss. Validation loss stays plain cross-entropy.",
    )


class TrainConfig(Section):
    """Training: the optimizer and schedule (every loop), and the Ray Train + DeepSpeed run (lm.train)."""

    batch_size: int = Field(16, ge=1, description="Micro-batch: sequences per worker per forward/backward.")
    global_batch_tokens: int | None = Field(
        None, ge=1, description="Tokens per optimizer step over all workers; sets gradient accumulation "
        "(must be a multiple of batch_size x seq_len x workers, for every allowed number of workers). "
        "null = no accumulation.",
    )
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW on every parameter. muon: DeepSpeed's Muon (momentum orthogonalised by "
        "Newton-Schulz iterations) on the hidden weight matrices, AdamW (lr, betas) on the embeddings, the head and "
        "the norm gains; ZeRO-0 (ZeRO 1-3 only with grad_clip 0: there DeepSpeed clips Muon's update, not the "
        "gradient), not with offload_optimizer.",
    )
    muon_lr: float = Field(0.02, gt=0, description="Peak learning rate of the Muon matrices (optimizer: muon); "
                           "the schedule scales it as it scales lr.")
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="Muon's momentum (optimizer: muon).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW; with muon, of the AdamW parameters).")
    min_lr: float = Field(1e-4, ge=0, description="Final learning rate of the cosine, linear or wsd schedule "
                          "(muon_lr ends at the same fraction of its peak).")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine", description="After warm-up: cosine or linear decay to min_lr at the end, constant lr, or wsd "
        "(warm-up, stable at lr, then linear decay to min_lr over the last decay_fraction).",
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of the run the decay takes.")
    warmup_steps: int = Field(50, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps (the schedule's length, unless schedule_unit is "
                           "seconds).")
    max_seconds: float | None = Field(
        None, gt=0, description="Stop after this much training time: the steps' own wall clock, evaluations and "
        "checkpoints excluded, summed across resumes (with schedule_unit steps the schedule is unchanged).",
    )
    schedule_unit: Literal["steps", "seconds"] = Field(
        "steps", description="What the schedule spans after warm-up: max_steps, or max_seconds of training time "
        "(the decay ends when the time is up; every worker follows rank 0's clock).",
    )
    stop_after_steps: int | None = Field(
        None, ge=1, description="End this invocation at this step (the schedule still spans max_steps); "
        "running again resumes from the last checkpoint.",
    )
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay on matrices (not norms).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables.")
    eval_interval: int = Field(100, ge=1, description="Evaluate (and checkpoint, under Ray Train) every N steps.")
    eval_batches: int = Field(
        10, ge=1, description="Micro-batches per validation estimate (over all workers): the first "
        "eval_batches x batch_size validation rows, the same every time; the only ones a worker holds.",
    )
    shuffle_window_rows: int = Field(
        4096, ge=1, description="Training rows are streamed (lm.data.stream): each epoch permutes the shards' "
        "row groups, cuts them into windows of at least this many rows and permutes the rows inside each "
        "window. Larger: a better shuffle, more memory per worker (about 2 windows plus the read-ahead).",
    )
    prefetch_chunks: int = Field(
        4, ge=1, description="Chunks of rows (a window's share, at most) each worker reads ahead in a "
        "background thread, so reading from storage overlaps compute.",
    )
    log_interval: int = Field(10, ge=1, description="Log training metrics every N steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when validation loss has not improved for this many evaluations; null = never."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Training dtype: fp32, bf16 (CPU or GPU) or fp16 (GPU only; DeepSpeed loss scaling)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the plain (single-process) loop runs.")
    seed: int = Field(1337, description="Seed for init, batch sampling and dropout.")
    init_from: Annotated[str | None, PATH] = Field(
        None, description="Start from this model directory's weights (fine-tuning); a resumed run uses its checkpoint."
    )
    distill: DistillConfig = Field(
        default_factory=DistillConfig, description="Knowledge distillation from a teacher model (off by default)."
    )
    trainer: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Train + DeepSpeed (lm.train.trainer); local: the plain single-process loop."
    )
    workers: int | tuple[int, int] = Field(
        2, description="Ray Train workers (data-parallel ranks): a number, or [min, max] for an elastic group "
        "that shrinks when workers are lost (down to min, from the last checkpoint, without waiting) and grows "
        "back to max when the cluster has room again (Ray Train's elastic ScalingConfig); an elastic group "
        "needs train.global_batch_tokens, so the global batch stays the same at every size.",
    )
    elastic_resize_monitor_interval_s: float = Field(
        60.0, ge=0, description="Elastic groups (train.workers: [min, max]): how often Ray Train checks whether "
        "a healthy group could grow (a grow restarts the group from its last checkpoint).",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves.")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves (> 0 trains on GPU).")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom Ray resources per worker (e.g. an accelerator type)."
    )
    zero_stage: Annotated[int, Field(ge=0, le=3)] | Literal["auto"] = Field(
        2, description="DeepSpeed ZeRO stage: 0 (DDP-like), 1, 2 or 3; auto: the lowest that fits the device's memory "
        "on paper (lm.train.ds_config.fit_memory: 0 on one worker, where partitioning only adds gathers; else 1, 2, "
        "then 3), chosen by each worker when training starts.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO >= 1: keep optimizer state on CPU (DeepSpeedCPUAdam).")
    offload_params: bool = Field(False, description="ZeRO-3: keep parameters on CPU between uses.")
    compile: bool = Field(
        False, description="torch.compile the model inside the DeepSpeed engine (engine.compile()); the first "
        "steps pay for compiling. On an H200 it took gpt2-124m (batch 16) from 185k to 257k tokens/s.",
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = Field(
        "default", description="train.compile's torch.compile mode: reduce-overhead adds CUDA graphs (GPU; for "
        "small models whose steps are launch-bound), max-autotune-no-cudagraphs tunes the kernels longer.",
    )
    activation_checkpointing: bool | Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        False, description="Recompute blocks' activations in backward (applied by lm.train.levers, not the model): "
        "true = every block, a number = that many blocks (the first ones), auto = the fewest that make a step fit "
        "the device's memory on paper (lm.train.ds_config.fit_memory; none where it fits).",
    )
    loss_kernel: Literal["torch", "chunked", "liger"] = Field(
        "torch", description="How the vocabulary projection's cross-entropy is computed: torch (float32 logits, "
        "then cross-entropy), chunked (lm.head_loss: chunks of rows with their gradients in the forward, never "
        "the whole [tokens, vocab] logits) or liger (liger-kernel's fused Triton kernel; GPU, `pip install "
        "liger-kernel`). Distillation needs the logits and keeps torch.",
    )
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="The SDPA kernel training may use: auto = PyTorch's choice; flash (also on CPU), "
        "cudnn and efficient (GPU), math (the reference). Serving is not affected.",
    )
    max_failures: int = Field(0, ge=-1, description="Worker-group restarts after a failure (-1: unlimited).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, ranked by validation loss (best kept).")
    poll_interval_s: float | None = Field(
        None, gt=0, le=60, description="How often Ray Train's controller polls the workers (its "
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; null = Ray's 2 s). A worker's report waits until the controller "
        "has taken the previous one, and a run ends at the poll after its last step: runs of seconds (tests, "
        "smoke checks) save time with 0.25; long runs on many workers keep Ray's default.",
    )
    worker_start_timeout_s: float | None = Field(
        None, gt=0, description="How long Ray Train waits for a worker group to start before it gives up and "
        "decides again (its RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S; null = Ray's 60 s). Ray's view of the "
        "cluster refreshes every 20 s, so right after losing a node an elastic group may first ask for its old "
        "size and wait this long before it restarts on the workers that remain.",
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="GPU memory per device this config is sized for (checked on paper by "
        "lm.train.ds_config.memory_estimate in the tests); null = not stated.",
    )
    peak_flops: float | None = Field(
        None, gt=0, description="Peak FLOP/s of one worker's device for MFU; null = measured once with a matmul."
    )

    @model_validator(mode="after")
    def _check_train(self) -> TrainConfig:
        if not 1 <= self.min_workers <= self.max_workers:
            shown = list(self.workers) if isinstance(self.workers, tuple) else self.workers
            raise ValueError(f"train.workers {shown}: a number >= 1, or [min, max] with 1 <= min <= max")
        if self.zero_stage == "auto" and (self.offload_params or self.offload_optimizer):
            raise ValueError("offload_optimizer / offload_params need an explicit zero_stage (auto never offloads)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.schedule_unit == "seconds" and self.max_seconds is None:
            raise ValueError("schedule_unit seconds needs max_seconds (the time the schedule spans)")
        if self.optimizer == "muon" and self.trainer == "local":
            raise ValueError("optimizer muon runs through DeepSpeed: use trainer ray (the plain loop has AdamW)")
        if self.optimizer == "muon" and self.zero_stage not in (0, "auto") and self.grad_clip > 0:
            raise ValueError("optimizer muon under ZeRO 1-3 with grad_clip: DeepSpeed folds Muon's orthogonalised "
                             "update into the gradient partitions and then clips that (measured: a first step 31x "
                             "too small), not the gradient; set train.zero_stage=0 or train.grad_clip=0")
        if self.optimizer == "muon" and self.offload_optimizer:
            raise ValueError("optimizer muon does not run with offload_optimizer (DeepSpeed's CPU Adam has no Muon): "
                             "set one of them")
        if self.precision == "fp16" and self.trainer == "ray" and self.gpus_per_worker == 0:
            raise ValueError("precision fp16 needs GPUs (DeepSpeed refuses fp16 on CPU): use bf16 or fp32, "
                             "or set gpus_per_worker")
        return self

    @property
    def min_workers(self) -> int:
        return self.workers[0] if isinstance(self.workers, tuple) else self.workers

    @property
    def max_workers(self) -> int:
        return self.workers[1] if isinstance(self.workers, tuple) else self.workers

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    def world_sizes(self) -> range:
        return range(self.min_workers, self.max_workers + 1)

    def grad_accum(self, seq_len: int, world: int) -> int:
        """Micro-batches per optimizer step on each of ``world`` workers (1 unless global_batch_tokens asks for
        more): the global batch stays ``global_batch_tokens`` whatever the number of workers."""
        per_micro_step = self.batch_size * seq_len * world
        if self.global_batch_tokens is None:
            return 1
        if self.global_batch_tokens % per_micro_step:
            raise ValueError(
                f"train.global_batch_tokens ({self.global_batch_tokens}) must be a multiple of batch_size x seq_len "
                f"x workers = {self.batch_size} x {seq_len} x {world} = {per_micro_step}"
            )
        return self.global_batch_tokens // per_micro_step

    def check_batch(self, seq_len: int) -> None:
        """Refuse (ValueError naming the numbers) a global batch that some allowed number of workers cannot
        keep, or an elastic group without a fixed global batch."""
        if self.elastic and self.global_batch_tokens is None:
            lcm = math.lcm(*self.world_sizes())
            raise ValueError(
                f"train.workers {list(self.workers)} is an elastic group: set train.global_batch_tokens so the "
                f"global batch stays the same at every size (a multiple of batch_size x seq_len x lcm of "
                f"{self.min_workers}..{self.max_workers} = {self.batch_size} x {seq_len} x {lcm} = "
                f"{self.batch_size * seq_len * lcm})"
            )
        for world in self.world_sizes():
            self.grad_accum(seq_len, world)
