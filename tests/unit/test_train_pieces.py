"""Ray-free training pieces: LR schedule, parameter groups, batch sampling, text stop sequences."""

import numpy as np
import pytest
import torch

from lm.config import TrainConfig
from lm.inference import cut_at_stop
from lm.train.local import row_batches, to_inputs_targets
from lm.train.optim import lr_at, param_groups


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 120))


def test_param_groups_decay_matrices_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_row_batches_cover_each_epoch_and_shift_targets():
    rows = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    batches = row_batches(rows, 3, seed=1)
    epoch0 = [next(batches) for _ in range(3)]  # 10 rows → 3 full batches, 1 row left over
    seen = np.concatenate(epoch0)[:, 0]
    assert len(set(seen.tolist())) == 9
    epoch1 = [next(batches) for _ in range(3)]
    assert not all(np.array_equal(a, b) for a, b in zip(epoch0, epoch1, strict=True))
    again = row_batches(rows, 3, seed=1)
    assert all(np.array_equal(next(again), b) for b in epoch0)  # seeded: same order
    x, y = to_inputs_targets(epoch0[0], torch.device("cpu"))
    assert x.shape == (3, 4) and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match="too few"):
        next(row_batches(rows[:2], 3, seed=1))


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
