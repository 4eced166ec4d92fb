"""Generation metrics: BLEU / ROUGE / F1 against hand-computed values, label choice, built-in prompt sets."""

import math

import numpy as np
import pytest
import torch

from lm.config import ModelConfig, TokenizerConfig, load_config
from lm.data.sources import DataError
from lm.eval.generation import (
    bleu_rouge,
    choose_labels,
    classification_scores,
    continuation_logprobs,
    greedy_continuations,
)
from lm.eval.sets import builtin_continuations, builtin_labelled, read_jsonl
from lm.model import Transformer
from lm.storage import ObjectStore
from lm.tokenizer import train_tokenizer


def test_bleu_and_rouge_known_values():
    same = bleu_rouge(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100) and same["rouge1"] == same["rouge2"] == same["rougeL"] == 1.0
    # every n-gram of the hypothesis matches; only the brevity penalty exp(1 − 6/5) is left
    short = bleu_rouge(["the cat sat on the"], ["the cat sat on the mat"])
    assert short["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 5), rel=1e-4)
    # ROUGE-1: P 3/3, R 3/6 → F 2/3; ROUGE-2: P 2/2, R 2/5 → F 4/7; ROUGE-L: LCS 3 → F 2/3
    part = bleu_rouge(["the cat sat"], ["the cat sat on the mat"])
    assert (part["rouge1"], part["rouge2"], part["rougeL"]) == pytest.approx((2 / 3, 4 / 7, 2 / 3))
    # ROUGE is averaged over examples
    two = bleu_rouge(["the cat sat", "x y"], ["the cat sat on the mat", "a b"])
    assert two["rouge1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="as many"):
        bleu_rouge(["a"], [])


def test_precision_recall_f1_known_values():
    s = classification_scores(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert s["accuracy"] == 0.75
    assert s["per_label"]["a"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert s["per_label"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert s["f1_macro"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert s["precision_macro"] == pytest.approx(5 / 6) and s["recall_macro"] == pytest.approx(0.75)
    # a label never predicted scores 0, not an error
    assert classification_scores(["a", "b"], ["a", "a"], ["a", "b"])["per_label"]["b"]["precision"] == 0.0


@pytest.fixture(scope="module")
def tiny():
    tok = train_tokenizer(["ROMEO:\nBut soft, what light.", "JULIET:\nO Romeo."] * 30,
                          TokenizerConfig(vocab_size=300, min_frequency=1))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=1, n_heads=2, d_model=32, max_seq_len=24, vocab_size=tok.vocab_size))
    return model.eval(), tok


def test_continuation_logprobs_equal_one_unbatched_forward_each(tiny):
    model, tok = tiny
    prompts = ["ROMEO:\nBut", "JULIET:\nO Romeo. " * 10, "x"]  # the second is cut to its last tokens
    conts = [" soft", " what light", "ROMEO:"]
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=2)
    for prompt, cont, value in zip(prompts, conts, got, strict=True):
        c = tok.encode(cont)
        p = tok.encode(prompt)[-(24 - len(c)):]
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(ids)[0][0], -1)
        expected = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(c))
        assert value == pytest.approx(expected, abs=1e-4)
    labels = ["ROMEO:", "JULIET:", "soft"]
    chosen = choose_labels(model, tok, prompts, labels)
    scores = continuation_logprobs(model, tok, [p for p in prompts for _ in labels], labels * 3).reshape(3, 3)
    assert chosen == [labels[i] for i in np.argmax(scores, axis=1)]


def test_greedy_continuations_stop_after_content(tiny):
    model, tok = tiny
    outs = greedy_continuations(model, tok, ["ROMEO:\n", "JULIET:"], max_new_tokens=8, stop=["\n"])
    ids = model.generate([tok.encode("ROMEO:\n")], 8, temperature=0.0, eos_id=tok.eos_id)[0]
    full = tok.decode(ids).lstrip()
    assert outs[0] == full.split("\n")[0].strip() and "\n" not in outs[0]
    assert len(outs) == 2


def test_builtin_prompt_sets_are_deterministic_and_held_out():
    cfg = load_config("configs/tiny.yaml")
    store = ObjectStore()
    cont = builtin_continuations(store, cfg, 12)
    assert len(cont) == 12 and cont == builtin_continuations(store, cfg, 12)
    assert all(c["prompt"].count("\n") == 2 and c["reference"] and "\n" not in c["reference"] for c in cont)
    labelled = builtin_labelled(store, cfg, 30)
    labels = {e["label"] for e in labelled}
    assert len(labelled) == 30 and 2 <= len(labels) <= 4 and all(lab.endswith(":") for lab in labels)
    assert all(e["prompt"].endswith("\n\n") for e in labelled)
    # with no held-out split every speech may be drawn, so the sets change
    everything = load_config("configs/tiny.yaml", ["data.val_fraction=0"])
    assert builtin_continuations(store, everything, 12) != cont


def test_jsonl_prompt_sets_name_bad_lines(tmp_path):
    good = tmp_path / "g.jsonl"
    good.write_text('{"prompt": "a", "label": "x"}\n\n{"prompt": "b", "label": "y", "extra": 1}\n')
    assert read_jsonl(ObjectStore(), str(good), ["prompt", "label"]) == [
        {"prompt": "a", "label": "x"}, {"prompt": "b", "label": "y"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "a", "label": "x"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r"b\.jsonl: line 2 needs string fields"):
        read_jsonl(ObjectStore(), str(bad), ["prompt", "label"])
