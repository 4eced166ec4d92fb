"""Samples shown to people mark document boundaries with a ─── line instead of the raw <|endoftext|>;
what is stored (generations JSON, report.json) keeps the model's output as it was."""

import json

from lm.cli import main
from lm.eval.report import markdown
from lm.sample_text import show_documents

EOS = "<|endoftext|>"
SAMPLE = f"\nO, she doth teach the torches!{EOS}JULIET:\nAy me!\n{EOS}\nFirst Citizen:\nWe"
SHOWN = "ROMEO:\nO, she doth teach the torches!\n\n───\n\nJULIET:\nAy me!\n\n───\n\nFirst Citizen:\nWe"


def test_boundaries_become_separator_lines():
    assert show_documents("ROMEO:" + SAMPLE) == SHOWN
    assert show_documents(f"a{EOS}") == "a\n\n───"
    assert show_documents(f"{EOS}b") == "───\n\nb"
    assert show_documents("no boundary\n") == "no boundary\n"
    assert show_documents("a</s>b", eos_token="</s>") == "a\n\n───\n\nb"


def test_lm_generate_prints_separators_and_stores_the_raw_text(small_tokenizer, tmp_path, monkeypatch,
                                                               capsys):
    import lm.inference
    import lm.modeldir

    monkeypatch.setattr(lm.modeldir, "load_model_dir", lambda store, uri: lm.modeldir.LoadedModel(
        model=None, tokenizer=small_tokenizer))
    monkeypatch.setattr(lm.inference, "generate_text", lambda model, tok, prompts, gen: [SAMPLE])
    assert main(["generate", "--prompt", "ROMEO:", f"storage.root={tmp_path}"]) == 0
    shown = capsys.readouterr().out
    assert SHOWN in shown
    assert EOS not in shown
    (stored,) = (tmp_path / "runs" / "default" / "generations").glob("*.json")
    assert json.loads(stored.read_text())["completion"] == SAMPLE


def test_report_markdown_shows_separators(tmp_path):
    report = {
        "model": {"uri": "m", "parameters": 1, "vocab_size": 300}, "run_uri": "r", "created": "now",
        "seconds": 1.0, "ngram": {"order": 3, "note": "none"}, "sets": {}, "plots": [],
        "training": {"note": "no training logs"}, "samples": [{"prompt": "ROMEO:", "completion": SAMPLE}],
    }
    md = markdown(report)
    assert f"```\n{SHOWN}\n```" in md
    assert EOS not in md and report["samples"][0]["completion"] == SAMPLE
