"""The DeepSpeed config generated from ours, the GPU presets and their on-paper memory (no Ray, no GPU)."""

from pathlib import Path

import pytest

from lm.config import ConfigError, TrainConfig, load_config
from lm.model import num_params
from lm.train.ds_config import deepspeed_config, fit_memory, memory_estimate

REPO = Path(__file__).parents[2]


def test_stage_precision_accumulation_and_optimizer():
    tc = TrainConfig(zero_stage=2, precision="bf16", batch_size=4, workers=2, global_batch_tokens=4 * 64 * 2 * 3,
                     grad_clip=0.5, lr=3e-4, weight_decay=0.05)
    ds = deepspeed_config(tc, seq_len=64, world=2, on_gpu=False)
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"]) == (4, 3, 24)
    assert ds["gradient_clipping"] == 0.5
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] and params["lr"] == 3e-4
    assert params["weight_decay"] == 0.05


def test_offload_and_zero3():
    ds = deepspeed_config(TrainConfig(zero_stage=3, offload_optimizer=True, offload_params=True), seq_len=64, world=1,
                          on_gpu=True)
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"]
    assert "torch_adam" not in ds["optimizer"]["params"]  # DeepSpeedCPUAdam for offloaded state


def test_bad_training_configs_fail_before_work():
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        load_config(REPO / "configs/tiny.yaml", ["train.global_batch_tokens=1000"])
    with pytest.raises(ConfigError, match="fp16 needs GPUs"):
        load_config(REPO / "configs/tiny.yaml", ["train.precision=fp16"])
    with pytest.raises(ConfigError, match="offload_params needs zero_stage 3"):
        load_config(REPO / "configs/tiny.yaml", ["train.offload_params=true"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(REPO / "configs/tiny.yaml", ["train.zero_stage=4"])
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        deepspeed_config(TrainConfig(precision="fp16", gpus_per_worker=1), seq_len=64, world=1, on_gpu=False)


def test_an_elastic_group_keeps_one_global_batch_at_every_size():
    """train.workers [min, max]: accumulation adjusts so every size trains on the same global batch; a global
    batch some allowed size cannot keep is refused at load, naming the numbers."""
    tiny = REPO / "configs/tiny.yaml"  # batch_size 8, seq_len 64
    tc = load_config(tiny, ["train.workers=[2, 3]", "train.global_batch_tokens=3072"]).train
    assert (tc.elastic, tc.min_workers, tc.max_workers) == (True, 2, 3)
    sizes = {w: deepspeed_config(tc, seq_len=64, world=w, on_gpu=False) for w in (2, 3)}
    assert [sizes[w]["gradient_accumulation_steps"] for w in (2, 3)] == [3, 2]
    assert {ds["train_batch_size"] for ds in sizes.values()} == {48}  # 48 x 64 = 3072 tokens either way
    with pytest.raises(ConfigError, match=r"8 x 64 x 3 = 1536"):  # fine for 2 workers, not for 3
        load_config(tiny, ["train.workers=[2, 3]", "train.global_batch_tokens=2048"])
    with pytest.raises(ConfigError, match=r"elastic group: set train.global_batch_tokens.*8 x 64 x 6 = 3072"):
        load_config(tiny, ["train.workers=[2, 3]"])
    with pytest.raises(ConfigError, match=r"\[3, 2\]: a number >= 1, or \[min, max\]"):
        load_config(tiny, ["train.workers=[3, 2]", "train.global_batch_tokens=3072"])
    with pytest.raises(ConfigError, match=r"a number >= 1"):
        load_config(tiny, ["train.workers=0"])
    assert not load_config(tiny, ["train.workers=[2, 2]"]).train.elastic  # [n, n] is a fixed group of n


@pytest.mark.parametrize("preset, params_m, stage", [("gpt2-124m", 124, 1), ("1b-zero3", 1100, 1)])
def test_gpu_presets_are_consistent_and_fit_their_gpus(preset, params_m, stage):
    preset_cfg = load_config(REPO / f"configs/{preset}.yaml")
    cfg, plan = fit_memory(preset_cfg, world=preset_cfg.train.workers, memory_gb=None)  # their gpu_memory_gb
    assert plan.recomputed == 0  # both fit 40 GB GPUs without recomputation
    tc = cfg.train
    assert abs(num_params(cfg.model) / 1e6 - params_m) / params_m < 0.05
    ds = deepspeed_config(tc, seq_len=cfg.seq_len, world=tc.workers, on_gpu=True)
    assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"]
    assert ds["train_batch_size"] * cfg.seq_len == tc.global_batch_tokens
    estimate = memory_estimate(cfg, gpus=tc.workers)
    assert 0 < estimate.total < 0.9 * tc.gpu_memory_gb * 2**30, estimate.as_dict()
    # and the same model without ZeRO's partitioning or checkpointing would need more
    plain = cfg.model_copy(update={"train": tc.model_copy(update={"zero_stage": 0, "activation_checkpointing": False})})
    assert memory_estimate(plain, gpus=tc.workers).total > estimate.total
