"""Ray-free training pieces: LR schedule, parameter groups, inputs and targets, text stop sequences, and the
setting lm.train hands to Ray Train's controller."""

import json
import os

import numpy as np
import pytest
import torch

from lm.config import TrainConfig
from lm.inference import cut_at_stop
from lm.train.local import to_inputs_targets
from lm.train.optim import EarlyStopping, lr_at, lr_scale, param_groups


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_wsd_schedule_holds_then_decays_over_its_last_fraction_by_steps_or_by_seconds():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(5, cfg) == pytest.approx(0.6)  # warm-up
    assert [lr_at(s, cfg) for s in (10, 50, 90)] == [1.0, 1.0, 1.0]  # stable until 80% of the 100 steps after it
    assert lr_at(100, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    timed = cfg.model_copy(update={"schedule_unit": "seconds", "max_seconds": 300.0})
    assert lr_at(500, timed, seconds=200.0) == 1.0  # the step count no longer matters after warm-up
    assert (lr_at(20, timed, seconds=270.0) == pytest.approx(0.55)
            and lr_at(20, timed, seconds=400.0) == pytest.approx(0.1))
    assert lr_scale(20, timed, seconds=270.0) == pytest.approx(0.55)  # the fraction every group's peak is scaled by
    with pytest.raises(ValueError, match="schedule_unit seconds needs max_seconds"):
        TrainConfig(schedule_unit="seconds")


def test_muon_is_refused_where_it_cannot_run():
    assert TrainConfig(optimizer="muon", zero_stage=0).optimizer == "muon"
    with pytest.raises(ValueError, match="muon runs through DeepSpeed"):
        TrainConfig(optimizer="muon", trainer="local", zero_stage=0)
    with pytest.raises(ValueError, match="muon does not run with offload_optimizer"):
        TrainConfig(optimizer="muon", zero_stage=2, offload_optimizer=True, grad_clip=0)
    with pytest.raises(ValueError, match=r"set train\.zero_stage=0 or train\.grad_clip=0"):
        TrainConfig(optimizer="muon", zero_stage=1, grad_clip=1.0)
    assert TrainConfig(optimizer="muon", zero_stage=0, grad_clip=1.0).grad_clip == 1.0


def test_mfu_peak_is_one_fixed_number_per_machine(tmp_path, monkeypatch):
    """The peak is stated, a GPU's datasheet, or a calibration cached under the machine's description:
    measured once, then read back (a value planted in the cache is what the next run divides by)."""
    from lm.train import peak

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    assert peak.device_peak(cpu, given=5e11) == peak.Peak(5e11, "train.peak_flops")
    assert peak.datasheet_tflops("NVIDIA H200") == 989.4 and peak.datasheet_tflops("a toaster") is None
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda device: 1.5e11)
    first = peak.device_peak(cpu)
    assert first.flops == 1.5e11 and "calibrated" in first.source
    known = json.loads(peak.cache_path().read_text())
    assert list(known) == [peak.machine_description(cpu)] and f"{os.cpu_count()} logical cores" in next(iter(known))
    peak.cache_path().write_text(json.dumps({peak.machine_description(cpu): 1.9e11}))
    monkeypatch.setattr(peak, "measure_matmul_flops", lambda device: pytest.fail("measured again"))
    assert peak.device_peak(cpu).flops == 1.9e11
    cores = os.cpu_count()
    assert peak.worker_share(peak.Peak(1.9e11, "calibrated"), cpu, 1) == pytest.approx(1.9e11 / cores)
    assert peak.worker_share(peak.Peak(5e11, "train.peak_flops"), cpu, 1) == 5e11


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_to_inputs_targets_shifts_rows_by_one():
    rows = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    x, y = to_inputs_targets(rows[:3], torch.device("cpu"))
    assert x.shape == (3, 4) and torch.equal(y, x + 1)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules(schedule):
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule=schedule)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    middle, end = lr_at(60, cfg), lr_at(110, cfg)
    expected = {"cosine": (0.55, 0.1), "linear": (0.55, 0.1), "constant": (1.0, 1.0)}[schedule]
    assert (middle, end) == pytest.approx(expected)
    if schedule == "cosine":
        assert lr_at(35, cfg) > 0.55 + 0.45 / 2  # cosine stays high longer than linear


def test_cut_at_stop():
    assert cut_at_stop("abc\n\ndef", ["\n\n"]) == ("abc", True)
    assert cut_at_stop("abcdef", ["de", "b"]) == ("a", True)
    assert cut_at_stop("abc", []) == ("abc", False)


def test_generate_text_stops_at_eos_unless_told_not_to():
    from lm.config import GenerateConfig, ModelConfig, TokenizerConfig
    from lm.inference import generate_text
    from lm.model import Transformer
    from lm.tokenizer import train_tokenizer

    tok = train_tokenizer(["to be or not to be"] * 20, TokenizerConfig(vocab_size=300))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=16, vocab_size=tok.vocab_size, max_seq_len=64))
    with torch.no_grad():  # make end-of-text the overwhelmingly likely next token
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.eos_id] = 1.0
        model.model.norm.weight.fill_(10.0)
    greedy = GenerateConfig(temperature=0, max_new_tokens=5, top_k=None)
    assert generate_text(model, tok, ["to be"], greedy) == [""]
    past = generate_text(model, tok, ["to be"], greedy.model_copy(update={"ignore_eos": True}))
    assert past == ["<|endoftext|>" * 5]


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(patience=2)
    assert [stop.update(v) for v in [3.0, 2.5, 2.6, 2.4, 2.4, 2.5]] == [False, False, False, False, False, True]
    assert stop.best == 2.4 and stop.bad_evals == 2
    resumed = EarlyStopping(2, best=stop.best, bad_evals=1)  # from a checkpoint's numbers
    assert resumed.update(2.45) is True
    never = EarlyStopping(None)
    assert not any(never.update(v) for v in [1.0, 2.0, 3.0, 4.0])


def test_init_from_loads_a_model_directory_and_refuses_another_shape(tmp_path, small_tokenizer):
    import torch

    from lm.config import GenerateConfig, ModelConfig, StorageConfig
    from lm.model import Transformer
    from lm.modeldir import save_model_dir
    from lm.storage import ObjectStore
    from lm.train.weights import load_init_weights

    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    cfg = ModelConfig(n_layers=2, n_heads=2, d_model=32, vocab_size=small_tokenizer.vocab_size, max_seq_len=32)
    torch.manual_seed(1)
    source = Transformer(cfg)
    save_model_dir(store, str(tmp_path / "prod"), source, small_tokenizer, GenerateConfig(), {"run": "prod"})
    torch.manual_seed(2)
    target = Transformer(cfg)
    assert not torch.equal(target.lm_head.weight, source.lm_head.weight)
    load_init_weights(target, store, str(tmp_path / "prod"))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    wider = Transformer(cfg.model_copy(update={"d_model": 64}))
    with pytest.raises(ValueError, match=r"init_from=.*model.embed_tokens.weight is \(\d+, 32\) there but"):
        load_init_weights(wider, store, str(tmp_path / "prod"))


def test_controller_settings_reach_ray_trains_controller_for_one_fit_only(monkeypatch):
    from ray.train.v2._internal.constants import (
        ENV_VARS_TO_PROPAGATE,
        HEALTH_CHECK_INTERVAL_S_ENV_VAR,
        WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
    )

    from lm.train.trainer import POLL_VAR, START_TIMEOUT_VAR, controller_env, controller_settings

    assert (POLL_VAR, START_TIMEOUT_VAR) == (HEALTH_CHECK_INTERVAL_S_ENV_VAR, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR)
    assert {POLL_VAR, START_TIMEOUT_VAR} <= ENV_VARS_TO_PROPAGATE  # Ray hands them on
    tc = TrainConfig(poll_interval_s=0.25, worker_start_timeout_s=20)
    monkeypatch.delenv(POLL_VAR, raising=False)
    monkeypatch.delenv(START_TIMEOUT_VAR, raising=False)
    with controller_env(controller_settings(tc)):
        assert (os.environ[POLL_VAR], os.environ[START_TIMEOUT_VAR]) == ("0.25", "20.0")
    assert POLL_VAR not in os.environ and START_TIMEOUT_VAR not in os.environ
    monkeypatch.setenv(POLL_VAR, "5")  # a user's own setting wins when the config leaves it at null
    with controller_env(controller_settings(TrainConfig())):
        assert os.environ[POLL_VAR] == "5" and START_TIMEOUT_VAR not in os.environ
    with controller_env(controller_settings(tc)):
        assert os.environ[POLL_VAR] == "0.25"
    assert os.environ[POLL_VAR] == "5"


def test_both_trainers_publish_through_one_function_with_one_lineage(tmp_path, small_tokenizer, small_model,
                                                                     write_manifest):
    """lm.train.publish: metrics, loss curve and the model directory, whose lineage.json has the same fields
    (Lineage) whichever trainer ran; what only one trainer knows (ZeRO stage, data position) is extra."""
    from lm.config import load_config
    from lm.modeldir import load_model_dir
    from lm.storage import ObjectStore
    from lm.train.publish import Lineage, RunFacts, publish_run
    from lm.train.run_log import progress_line

    history = [{"step": 1, "loss": 5.0, "lr": 1e-3, "memory_mib": 100.0},
               {"step": 2, "loss": 4.0, "val_loss": 4.5, "val_bpb": 3.2, "lr": 1e-3, "memory_mib": 100.0}]
    assert progress_line(history[1], 2) == "step     2/2 loss 4.0000 val 4.5000 (3.200 bpb) lr 1.00e-03 100 MiB"
    lineages = {}
    for facts in (RunFacts(tokens=64, trainer="local"),
                  RunFacts(tokens=64, trainer="ray+deepspeed", workers=2, zero_stage=1, data_position={"epoch": 0})):
        name = facts.trainer.replace("+", "-")
        cfg = load_config("configs/tiny.yaml", [f"storage.root={tmp_path}", f"name={name}"])
        store = ObjectStore(cfg.storage)
        manifest = write_manifest(store, cfg.data_uri, [], small_tokenizer, 64, kind="text")
        model_uri = publish_run(store, cfg, small_model(small_tokenizer), small_tokenizer, manifest, history, facts)
        assert store.exists(f"{cfg.run_uri}/train/metrics.jsonl") and store.exists(f"{cfg.run_uri}/train/loss.png")
        lineages[facts.trainer] = Lineage.model_validate(load_model_dir(store, model_uri).lineage)
    local, ray = lineages["local"], lineages["ray+deepspeed"]
    assert (local.steps, local.final_loss, local.val_loss, local.data_inputs) == (2, 4.0, 4.5, "test")
    assert set(local.model_dump(exclude_none=True)) | {"zero_stage", "data_position"} == set(
        ray.model_dump(exclude_none=True))
    assert (ray.workers, ray.zero_stage, local.zero_stage) == (2, 1, None)
