"""lm-evaluation-harness pieces without Ray: the shipped tasks' data from held-out speeches, their YAMLs as
the real lm-eval loads them, lmforge's log-likelihoods against the harness's HF backend on a model
directory, harness metrics in reports and as compare / gate rules."""

import json
import os
import re

import pytest
import torch

from lm.config import ConfigError, GenerateConfig, load_config
from lm.config.eval import CompareRule
from lm.continual.iteration import gate_config
from lm.eval.compare import compare, flat_metrics
from lm.eval.harness.data import (
    CLOZE,
    WHO_SPEAKS,
    cloze_item,
    cloze_items,
    speaker_items,
    speaker_pool,
    template,
    write_tasks,
)
from lm.eval.harness.run import check_endpoint, offline
from lm.eval.likelihood import encode_pair, loglikelihoods
from lm.eval.report import markdown
from lm.eval.sets import speeches
from lm.modeldir import save_model_dir
from lm.storage import ObjectStore

SONNET = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\nRough winds do "
          "shake the darling buds of May,\nAnd summer's lease hath all too short a date.\n")
SPEECH = "ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun."


def tokens(tok, context, continuation):
    ctx, cont = encode_pair(tok, context, continuation)
    return len(ctx) + len(cont)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    cfg = load_config("configs/tiny.yaml", [f"storage.root={tmp_path_factory.mktemp('h')}"])
    every = speeches(ObjectStore(cfg.storage), cfg)
    return [(s, t) for s, t, held in every if held], [s for s, _, _ in every]


def test_cloze_item_is_the_last_word_and_keeps_the_last_lines_that_fit(small_tokenizer):
    whole = cloze_item(small_tokenizer, SPEECH, budget=200)
    assert whole.model_dump() == {"context": SPEECH[: SPEECH.rindex(" ")], "target": "sun"}
    short = cloze_item(small_tokenizer, SPEECH, budget=tokens(small_tokenizer, whole.context, " sun") - 1)
    assert short.context == "ROMEO:\nIt is the east, and Juliet is the" and short.target == "sun"
    assert cloze_item(small_tokenizer, SPEECH, budget=5) is None  # not even the last line fits
    assert cloze_item(small_tokenizer, "ROMEO:\nO!", budget=50) is None  # no word at the end


def test_items_from_held_out_speeches_fit_the_budget_and_are_reproducible(small_tokenizer, held_out):
    speeches_held, speakers = held_out
    items = cloze_items(speeches_held, small_tokenizer, budget=63, limit=30)
    assert len(items) == 30 and len({i.context for i in items}) == 30
    assert all(tokens(small_tokenizer, i.context, " " + i.target) <= 63 for i in items)
    assert all(re.fullmatch(r"[A-Za-z']+", i.target) for i in items)
    texts = {t for _, t in speeches_held}
    assert all(any(i.context.split("\n", 1)[1] in t for t in texts) for i in items)  # held-out text
    pool = speaker_pool(speakers)
    who = speaker_items(speeches_held, pool, small_tokenizer, budget=63, limit=25, seed=1)
    assert len(who) == 25 and who == speaker_items(speeches_held, pool, small_tokenizer, 63, 25, seed=1)
    for item in who:
        assert len(set(item.choices)) == 4 and set(item.choices) <= {f"{p}:" for p in pool}
        assert item.choices[item.label] == f"{item.speaker}:"
        assert all(tokens(small_tokenizer, c, "\n" + item.line) <= 63 for c in item.choices)
    assert [i.label for i in who] != [i.label for i in speaker_items(speeches_held, pool, small_tokenizer, 63, 25,
                                                                    seed=2)]
    assert sorted({i.label for i in who}) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, small_tokenizer, small_model):
    folder = tmp_path_factory.mktemp("published") / "model"
    store = ObjectStore(load_config("configs/tiny.yaml", [f"storage.root={folder.parent}"]).storage)
    save_model_dir(store, str(folder), small_model(small_tokenizer), small_tokenizer, GenerateConfig(),
                   {"run": "unit"})
    return folder


def test_the_real_harness_on_a_model_directory_gives_lmforges_loglikelihoods(tmp_path, model_dir, small_tokenizer,
                                                                            held_out):
    """lm-eval's TaskManager loads the written YAMLs offline; its HF backend's answer to every request equals
    lm.eval.likelihood's with lmforge's Transformer (to 1e-4), and so does its greedy flag."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm.modeldir import load_model

    speeches_held, speakers = held_out
    include = write_tasks(tmp_path / "tasks", {
        CLOZE: cloze_items(speeches_held, small_tokenizer, 63, 8),
        WHO_SPEAKS: speaker_items(speeches_held, speaker_pool(speakers), small_tokenizer, 63, 6, seed=0)})
    assert template(CLOZE)["dataset_kwargs"]["data_files"]["test"] is None  # the packaged template
    with offline():
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32"}, tasks=[CLOZE, WHO_SPEAKS],
            task_manager=TaskManager(include_path=str(include), include_defaults=False), batch_size=8,
            device="cpu", log_samples=True, bootstrap_iters=0)
    rows = [(a, r[0]) for task in (CLOZE, WHO_SPEAKS) for s in results["samples"][task]
            for a, r in zip(s["arguments"], s["resps"], strict=True)]
    assert len(rows) == 8 + 6 * 4
    assert all(cont.startswith(" ") for (_, cont), _ in rows[:8]) and all(c.startswith("\n") for (_, c), _ in rows[8:])
    assert all(tokens(small_tokenizer, *args) <= 63 for args, _ in rows)  # no backend truncates
    ours = loglikelihoods(load_model(model_dir, dtype=torch.float32), small_tokenizer, [a for a, _ in rows])
    assert max(abs(theirs[0] - ll) for (_, theirs), (ll, _) in zip(rows, ours, strict=True)) < 1e-4
    assert [bool(theirs[1]) for _, theirs in rows] == [g for _, g in ours]
    assert set(results["results"][WHO_SPEAKS]) >= {"acc,none", "acc_norm,none"}


def test_an_endpoint_that_does_not_answer_is_named_before_the_harness_runs():
    import socket

    from lm.data.sources import DataError

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DataError, match=f"endpoint http://127.0.0.1:{port}/v1: no OpenAI-style /models answer"):
        check_endpoint(load_config("configs/tiny.yaml", []), f"http://127.0.0.1:{port}/v1")


def test_offline_sets_the_hub_variables_while_it_runs_then_restores_them(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    with offline():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"


def test_loglikelihoods_split_tokens_as_the_harness_and_truncate_on_the_left(small_tokenizer, small_model):
    model = small_model(small_tokenizer)
    ctx, cont = encode_pair(small_tokenizer, "ROMEO: But soft ", "light")  # the trailing space moves
    assert small_tokenizer.decode(ctx) == "ROMEO: But soft" and small_tokenizer.decode(cont) == " light"
    assert encode_pair(small_tokenizer, "", "light") == ([small_tokenizer.eos_id], small_tokenizer.encode("light"))
    (ll, _), = loglikelihoods(model, small_tokenizer, [("ROMEO: But soft", " light")])
    logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0][0], dim=-1)
    assert ll == pytest.approx(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)), abs=1e-5)
    long_context = "ROMEO: " + "soft light " * 80
    (far, _), (near, _) = loglikelihoods(model, small_tokenizer, [(long_context, " breaks"),
                                                                  ("soft light " * 40, " breaks")])
    assert far == pytest.approx(near, abs=1e-4)  # only the last max_seq_len + 1 tokens count


def test_echo_scoring_reports_an_end_of_text_as_the_token_generated(small_tokenizer, small_model):
    """lm-eval's local-completions asks for max_tokens 1 and reads every logprob but the last as the prompt's:
    when the greedy token is end-of-text, the engine still reports it (as OpenAI and vLLM do)."""
    from lm.serve.engine import Engine, GenRequest

    tok, model = small_tokenizer, small_model(small_tokenizer)
    ids = tok.encode("ROMEO:\nBut soft, what light")
    eos = GenRequest(ids, 1, temperature=0, logprobs=True, top_logprobs=1, prompt_logprobs=True,
                     logit_bias={tok.eos_id: 100.0})
    plain = GenRequest(ids, 1, temperature=0, logprobs=True, logit_bias={tok.eos_id: 100.0})
    scored, unscored = Engine(model, tok).generate([eos, plain])
    assert scored.finish_reason == "stop" and scored.text == "" and scored.token_ids == [tok.eos_id]
    assert len(scored.prompt_logprobs) == len(ids) and len(scored.logprobs) == len(scored.top_logprobs) == 1
    (expected, _), = loglikelihoods(model, tok, [("ROMEO:\nBut soft,", " what light")])
    assert sum(scored.prompt_logprobs[len(tok.encode("ROMEO:\nBut soft,")):]) == pytest.approx(expected, abs=1e-4)
    assert unscored.token_ids == [] and unscored.finish_reason == "stop"  # without echo: as before


def test_harness_metrics_in_flat_metrics_reports_and_compare_rules():
    report = {"sets": {}, "harness": {"tasks": {CLOZE: {"acc": 0.4, "acc_stderr": 0.1, "perplexity": 90.0}}}}
    assert flat_metrics(report) == {f"harness/{CLOZE}/acc": 0.4, f"harness/{CLOZE}/perplexity": 90.0}
    old = {f"harness/{CLOZE}/acc": 0.45, f"harness/{CLOZE}/perplexity": 100.0}
    acc = CompareRule(set="harness", metric=f"{CLOZE}/acc", max_regression=0.05)
    ppl = CompareRule(set="harness", metric=f"{CLOZE}/perplexity", min_improvement=5)
    assert acc.key == f"harness/{CLOZE}/acc" and acc.higher_better and not ppl.higher_better
    assert compare(flat_metrics(report), old, [acc, ppl]).passed  # 0.05 lower: at the tolerance; ppl 10 lower
    verdict = compare({**flat_metrics(report), f"harness/{CLOZE}/acc": 0.39}, old, [acc])
    assert not verdict.passed and "regressed by 0.06 > allowed 0.05" in verdict.reasons[0]
    missing = compare({}, old, [CompareRule(set="harness", metric=f"{WHO_SPEAKS}/acc", max_regression=0)])
    assert missing.reasons == [f"FAIL harness/{WHO_SPEAKS}/acc: not measured for the candidate and baseline"]


def test_harness_config_rules_and_the_continual_gate():
    cfg = load_config("configs/tiny.yaml", [f"eval.harness.tasks=[{WHO_SPEAKS}]", "eval.harness.limit=5",
                                            f"eval.compare=[{{set: harness, metric: {CLOZE}/acc, max_regression: 0}}]"])
    assert cfg.eval.harness.limit == 5 and cfg.eval.harness_tasks() == [WHO_SPEAKS, CLOZE]
    gated = load_config("configs/tiny.yaml", [
        f"continual.gate=[{{set: fixed, metric: bpb, max_regression: 0.02}}, "
        f"{{set: harness, metric: {CLOZE}/acc, max_regression: 0.05}}]"])
    ev = gate_config(gated, 3, "gate.jsonl").eval
    assert ev.harness_tasks() == [CLOZE] and [r.key for r in ev.compare] == ["fixed/bpb", f"harness/{CLOZE}/acc"]
    bad = {"eval.harness.nope=1": "nope", "eval.harness.limit=0": "limit",
           "eval.compare=[{set: harness, metric: acc, max_regression: 0}]": "'<task>/<metric>'",
           "continual.gate=[{set: labels, metric: accuracy, max_regression: 0}]": "unknown sets"}
    for override, message in bad.items():
        with pytest.raises(ConfigError) as err:
            load_config("configs/tiny.yaml", [override])
        assert message in str(err.value), (override, str(err.value))


def test_report_of_a_harness_only_evaluation():
    harness = {"backend": "local-completions", "target": "http://127.0.0.1:8000/v1", "tokenizer": "/m",
               "tasks": {CLOZE: {"acc": 0.5, "acc_stderr": 0.1}}, "items": {CLOZE: 20}, "lm_eval_version": "0.4.13",
               "seconds": 3.0, "check": {"requests": 20, "max_abs_diff": 2e-5, "greedy_disagreements": 0}}
    report = {"model": {"uri": "/m", "parameters": 10, "vocab_size": 400}, "run_uri": "/r", "created": "now",
              "seconds": 3.0, "sets": {}, "ngram": None, "harness": harness, "training": {"note": "none"}, "plots": [],
              "baseline": {"uri": "/b", "harness": {"tasks": {CLOZE: {"acc": 0.45}}}}}
    text = markdown(report)
    assert "## Language modelling" not in text and "endpoint `http://127.0.0.1:8000/v1` (local-completions" in text
    assert f"| {CLOZE} | 20 | acc | 0.5000 | 0.1000 | 0.4500 |" in text and "max |Δ log-likelihood| 2.00e-05" in text
    json.dumps(report)


def test_a_whole_evaluation_with_harness_tasks_and_a_comparison_on_them(tmp_path, model_dir):
    """`lm eval` with eval.harness.tasks (and the continual gate, with a harness rule): the harness runs on
    candidate and baseline beside the usual sets, its metrics are judged like bits per byte."""
    from lm.eval.evaluate import evaluate

    (tmp_path / "sonnet.txt").write_text(SONNET)
    rules = (f"eval.compare=[{{set: text, metric: bpb, max_regression: 0}}, "
             f"{{set: harness, metric: {WHO_SPEAKS}/acc, max_regression: 0}}, "
             f"{{set: harness, metric: {CLOZE}/perplexity, min_improvement: 1}}]")
    cfg = load_config("configs/tiny.yaml", [
        f"storage.root={tmp_path}", f"eval.sets=[{{name: text, uri: '{tmp_path}/sonnet.txt'}}]", rules,
        "eval.generation_set=null", "eval.labelled_set=null", "eval.prompts=[]", f"eval.harness.tasks=[{CLOZE}]",
        "eval.harness.limit=4", f"eval.output={tmp_path}/eval"])
    result = evaluate(cfg, model_uri=str(model_dir), compare_to=str(model_dir), log=lambda _: None)
    assert set(result.report["harness"]["tasks"]) == {CLOZE, WHO_SPEAKS}  # WHO_SPEAKS: a rule judges it
    assert result.report["harness"]["items"] == {CLOZE: 4, WHO_SPEAKS: 4} and "text/bpb" in result.metrics
    assert [c["passed"] for c in result.verdict.checks] == [True, True, False]  # the same model: no improvement
    assert result.report["baseline"]["harness"]["tasks"] == result.report["harness"]["tasks"]
    assert len((tmp_path / "eval" / "harness_requests.jsonl").read_text().splitlines()) == 4 + 4 * 4
