"""The summary card `make demo` ends with (lm.card, ``lm summary``): what was built, the numbers, where things
are, what to try next, from the summary the main job writes."""

from __future__ import annotations

import json

import pytest

from lm.card import card, duration

SUMMARY = {  # the keys lm.pipeline.run_main writes to <run>/samples.json
    "name": "shakespeare-cpu", "run_uri": "./lmforge-store/runs/shakespeare-cpu",
    "model_uri": "./lmforge-store/runs/shakespeare-cpu/model", "params": 3_276_928, "vocab_size": 2048,
    "train_rows": 23_405, "steps": 1000, "train_seconds": 251.2, "first_loss": 7.61, "final_loss": 3.52,
    "val_loss": 3.71, "tokens_per_s": 16211.4, "workers": 2, "zero_stage": 2, "trainer": "ray",
    "stage_seconds": {"data": 27.3, "train": 264.0, "eval": 12.4, "sample": 0.8},
    "eval_report": "./lmforge-store/runs/shakespeare-cpu/eval/report.md",
    "eval": {"val/bpb": 2.431, "val/ngram_bpb": 2.689, "val/loss": 3.7}, "prompt": "ROMEO:", "sample": "...",
}


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (4.4, 59.6, 264, 3725)] == ["4 s", "1 min 0 s", "4 min 24 s", "1 h 2 min"]


def test_the_card_says_what_was_built_the_numbers_where_things_are_and_what_to_try():
    text = card(SUMMARY, config="configs/shakespeare-cpu.yaml", prog=".venv/bin/lm",
                registry={"uri": "./lmforge-store/registry", "production": "v000001", "versions": 2},
                sweep={"results": "./s/tune/results.csv", "best": "./s/tune/best.yaml", "trials": 2,
                       "best_line": "train.lr=0.004: val_bpb 2.4510"},
                logs="./lmforge-store/runs/shakespeare-cpu/logs")
    lines = text.splitlines()
    assert lines[0].startswith("── lmforge: shakespeare-cpu ") and set(lines[-1]) == {"─"}
    assert len(lines) <= 20
    for words in ("a 3,276,928-parameter GPT (BPE vocabulary 2,048), 1,000 steps on 23,405 rows with Ray Train "
                  "+ DeepSpeed ZeRO-2, 2 workers; loss 7.610 → 3.520",
                  "validation 2.431 bits/byte; n-gram baseline 2.689: the model is 0.258 better than the baseline",
                  "16,211 tokens/s", "data 27 s · train 4 min 24 s · eval 12 s · sample 1 s",
                  "2 trials; best train.lr=0.004: val_bpb 2.4510",
                  "report    ./lmforge-store/runs/shakespeare-cpu/eval/report.md",
                  "model     ./lmforge-store/runs/shakespeare-cpu/model",
                  "./lmforge-store/registry (2 versions, production v000001)",
                  "logs      ./lmforge-store/runs/shakespeare-cpu/logs",
                  "next      .venv/bin/lm chat -c configs/shakespeare-cpu.yaml",
                  '.venv/bin/lm generate -c configs/shakespeare-cpu.yaml --prompt "ROMEO:"',
                  ".venv/bin/lm serve -c configs/shakespeare-cpu.yaml"):
        assert words in text, words


def test_a_model_behind_its_baseline_and_an_empty_registry_are_said_plainly():
    worse = {**SUMMARY, "eval": {"val/bpb": 3.95, "val/ngram_bpb": 2.089}}
    text = card(worse, registry={"uri": "r", "production": None, "versions": 1})
    assert "the model is 1.861 behind the baseline" in text
    assert "r (empty: `lm continual` fills it)" in text and "lm chat\n" in text + "\n"  # no -c without a config


def test_lm_summary_prints_the_card_of_a_run_and_says_what_to_run_first_without_one(tmp_path, capsys):
    from lm.cli import main

    run = tmp_path / "runs" / "tiny"
    assert main(["summary", "-c", "configs/tiny.yaml", f"storage.root={tmp_path}"]) == 2
    assert "no run at" in capsys.readouterr().err
    run.mkdir(parents=True)
    (run / "samples.json").write_text(json.dumps({**SUMMARY, "name": "tiny", "run_uri": str(run)}))
    assert main(["summary", "-c", "configs/tiny.yaml", f"storage.root={tmp_path}",
                 "--sweep", "configs/tune/demo.yaml"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("── lmforge: tiny ") and "lm chat -c configs/tiny.yaml" in out
    rows = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:-1] if line[2:3] != " "}
    assert rows["logs"] == f"{run}/logs" and "registry" not in rows  # no registry here yet


@pytest.mark.parametrize("history, rate", [([{"tokens_per_s": 3.0}, {"loss": 1}, {"tokens_per_s": 1.0},
                                             {"tokens_per_s": 2.0}], 2.0), ([{"loss": 1.0}], None)])
def test_the_runs_tokens_per_second_is_the_median_of_its_records(history, rate):
    from lm.pipeline import tokens_per_s

    assert tokens_per_s(history) == rate
