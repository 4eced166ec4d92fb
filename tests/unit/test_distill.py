"""Knowledge distillation without Ray (lm.train.distill, lm.train.local): the loss, the config and
teacher checks, and a distilled student beating the same student trained alone."""

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lm.config import Config, ConfigError, GenerateConfig, StorageConfig, TokenizerConfig, load_config
from lm.modeldir import save_model_dir
from lm.storage import ObjectStore
from lm.tokenizer import train_tokenizer
from lm.train.distill import check_teacher, distill_loss, load_teacher
from lm.train.local import estimate_loss, train_local

CORPUS = Path(__file__).parents[2] / "lm" / "corpora" / "tinyshakespeare.txt.gz"


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_kl_vanishes_when_the_student_is_the_teacher_and_weight_zero_is_plain_cross_entropy():
    s, t = logits(2, 5, 11), logits(2, 5, 11, seed=1)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    ce = F.cross_entropy(s.view(-1, 11), y.view(-1))
    same = distill_loss(s, s.clone(), y, temperature=2.0, weight=0.7)
    assert same.kl.item() == pytest.approx(0.0, abs=1e-6)
    assert same.loss.item() == pytest.approx(0.3 * ce.item(), rel=1e-6)
    plain = distill_loss(s, t, y, temperature=2.0, weight=0.0)
    assert plain.loss.item() == pytest.approx(ce.item(), rel=1e-6) and plain.ce.item() == pytest.approx(ce.item())
    assert plain.kl.item() > 0.1  # measured, even though it carries no weight
    mixed = distill_loss(s, t, y, temperature=2.0, weight=0.25)
    assert mixed.loss.item() == pytest.approx(0.75 * ce.item() + 0.25 * 4 * plain.kl.item(), rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_temperature_softens_both_sides_and_scales_by_its_square(temperature):
    s, t = logits(3, 4, 9).requires_grad_(), logits(3, 4, 9, seed=1)
    y = torch.zeros(3, 4, dtype=torch.long)
    parts = distill_loss(s, t, y, temperature=temperature, weight=1.0)
    reference = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                         log_target=True, reduction="sum") / 12
    assert parts.kl.item() == pytest.approx(reference.item(), rel=1e-5)
    assert parts.loss.item() == pytest.approx(temperature**2 * reference.item(), rel=1e-5)
    # Hinton's gradient: d(T² KL)/d student = T (softmax(s/T) - softmax(t/T)) per position
    parts.loss.backward()
    expected = temperature * (F.softmax(s.detach() / temperature, -1) - F.softmax(t / temperature, -1)) / 12
    assert torch.allclose(s.grad, expected, atol=1e-6)


def test_positions_without_a_target_carry_no_kl():
    s, t = logits(2, 6, 7), logits(2, 6, 7, seed=1)
    y = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(3))
    y[0, :4] = -100  # a masked prompt (lm.train.local.to_inputs_targets)
    base = distill_loss(s, t, y, temperature=1.0, weight=0.5)
    changed = t.clone()
    changed[0, :4] = logits(4, 7, seed=9)
    assert distill_loss(s, changed, y, temperature=1.0, weight=0.5).loss.item() == pytest.approx(base.loss.item())
    changed[1, 0] += logits(7, seed=10)
    assert distill_loss(s, changed, y, temperature=1.0, weight=0.5).kl.item() != pytest.approx(base.kl.item())
    kept = y != -100
    per_position = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert base.kl.item() == pytest.approx(per_position[kept].mean().item(), rel=1e-5)


def test_a_wider_student_vocabulary_is_aligned_with_the_teachers():
    """Padding rows above the tokenizer's vocabulary: a student that matches the teacher on the shared
    ids and never predicts its extra ones has no KL; mass on the extra ids is penalised."""
    t = logits(2, 3, 8)
    s = torch.cat([t, torch.full((2, 3, 4), -1e4)], dim=-1)
    y = torch.zeros(2, 3, dtype=torch.long)
    assert distill_loss(s, t, y, temperature=1.0, weight=1.0).kl.item() == pytest.approx(0.0, abs=1e-6)
    s[..., 8:] = 5.0
    assert distill_loss(s, t, y, temperature=1.0, weight=1.0).kl.item() > 0.5
    with pytest.raises(ValueError, match="must agree"):
        distill_loss(s, t[:, :2], y, temperature=1.0, weight=1.0)


def test_distill_config_is_validated(tmp_path):
    for override, key in [("train.distill.weight=1.5", "train.distill.weight"),
                          ("train.distill.weight=-0.1", "train.distill.weight"),
                          ("train.distill.temperature=0", "train.distill.temperature"),
                          ("train.distill.tempreature=2", "train.distill.tempreature: unknown key")]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [override])
    cfg = load_config(None, ["train.distill.teacher=runs/big/model", "train.distill.weight=0.9"])
    assert (cfg.train.distill.temperature, cfg.train.distill.weight) == (1.0, 0.9)
    assert cfg.with_absolute_paths().train.distill.teacher.endswith("/runs/big/model")
    assert cfg.with_absolute_paths().train.distill.teacher.startswith("/")


def test_a_teacher_must_share_the_tokenizer_and_hold_the_context(tmp_path, small_tokenizer, small_model):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    good, short, other = (f"{tmp_path}/{name}" for name in ("good", "short", "other"))
    save_model_dir(store, good, small_model(small_tokenizer), small_tokenizer, GenerateConfig(), {})
    save_model_dir(store, short, small_model(small_tokenizer, max_seq_len=16), small_tokenizer, GenerateConfig(), {})
    other_tok = train_tokenizer(["to be or not to be, that is the question"] * 20, TokenizerConfig(vocab_size=300))
    save_model_dir(store, other, small_model(other_tok), other_tok, GenerateConfig(), {})

    with pytest.raises(ConfigError, match=r"train\.distill\.teacher=.*other: its tokenizer \(\d+ tokens"):
        check_teacher(store, other, small_tokenizer, 32)
    with pytest.raises(ConfigError, match=r"train\.distill\.teacher=.*short: its context is 16 tokens"):
        check_teacher(store, short, small_tokenizer, 32)
    with pytest.raises(ConfigError, match=r"train\.distill\.teacher=.*nothing: not a model directory"):
        check_teacher(store, f"{tmp_path}/nothing", small_tokenizer, 32)
    check_teacher(store, other, None, 32)  # data not prepared yet: the directory and context only

    teacher = load_teacher(store, good, small_tokenizer, 64, "bf16", "cpu")
    assert not teacher.training and teacher.model.embed_tokens.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_distilled_student_beats_the_same_student_trained_alone(tmp_path, small_tokenizer, small_model,
                                                                   one_torch_thread):
    """A 2-layer d64 teacher trained 300 steps, then a 1-layer d32 student for 200 steps with and without
    it (same seed, same batches): the teacher's logits lower the student's validation loss."""
    tok = small_tokenizer
    text = gzip.decompress(CORPUS.read_bytes()).decode()
    rows, val = (np.array(tok.encode(part), dtype=np.int32) for part in (text[:150_000], text[-30_000:]))
    rows, val = (a[: len(a) // 33 * 33].reshape(-1, 33) for a in (rows, val))  # seq_len 32
    tokens_per_byte = val.size / len(text[-30_000:].encode())
    train = {"batch_size": 16, "warmup_steps": 10, "lr": 3e-3, "eval_batches": 8, "log_interval": 1000,
             "device": "cpu"}
    teacher_cfg = Config(data={"seq_len": 32}, model={"max_seq_len": 64}, train={**train, "max_steps": 300})
    teacher = small_model(tok, d_model=64).train()
    train_local(teacher_cfg, teacher, rows, log=lambda _: None)
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    save_model_dir(store, f"{tmp_path}/teacher", teacher, tok, GenerateConfig(), {})

    cpu, bpb = torch.device("cpu"), {}
    for name in ("alone", "distilled"):
        distill = {"teacher": f"{tmp_path}/teacher"} if name == "distilled" else {}
        cfg = Config(data={"seq_len": 32}, model={"max_seq_len": 64},
                     train={**train, "max_steps": 200, "distill": distill})
        frozen = load_teacher(store, distill["teacher"], tok, 32, "fp32", cpu) if distill else None
        student = small_model(tok, d_model=32, n_layers=1).train()
        result = train_local(cfg, student, rows, val, log=lambda _: None, teacher=frozen)
        loss = estimate_loss(student, val, cfg, cpu)
        bpb[name] = loss / math.log(2) * tokens_per_byte
        assert ("distill_kl" in result.history[-1]) == (name == "distilled")
    bpb["teacher"] = estimate_loss(teacher, val, teacher_cfg, cpu) / math.log(2) * tokens_per_byte
    print(f"validation bits per byte: {bpb}")
    assert bpb["teacher"] < bpb["distilled"] < bpb["alone"] - 0.03, bpb
