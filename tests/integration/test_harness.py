"""lm-evaluation-harness (the real lm-eval package) on the session's tiny trained model: through its HF
backend on the model directory and through local-completions against a live Serve endpoint serving it.
Both give the same accuracy on the shipped tasks, and every request's log-likelihood equals lmforge's own
(lm.eval.likelihood, lmforge's Transformer) to 1e-4; `lm eval --harness --endpoint --compare` writes the
report and judges harness metrics by eval.compare rules; a model directory on S3 is downloaded for it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from serving import KEY, free_port

from lm.config import load_config
from lm.eval.harness.data import TASKS
from lm.eval.harness.run import model_args, run_harness
from lm.eval.likelihood import encode_pair, loglikelihoods
from lm.modeldir import load_model
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).parents[2]
LM = str(Path(sys.executable).parent / "lm")
LIMIT = 20


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def endpoint(tiny_run, monkeypatch_module):
    """The tiny run's model directory served on Serve (its own app and port) for the module."""
    from ray import serve

    from lm.serve.deploy import start

    monkeypatch_module.setenv("LMFORGE_API_KEYS", KEY)
    port = free_port()
    model_uri = tiny_run.summary["model_uri"]
    overrides = [*tiny_run.overrides, f"serve.port={port}", f"serve.model={model_uri}", "serve.app_name=harness",
                 "serve.replica_cpus=0.5", "serve.autoscaling.max_replicas=1", f"eval.harness.limit={LIMIT}",
                 f"eval.output={tiny_run.root}/eval-harness"]
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    start(cfg)
    yield {"cfg": cfg, "overrides": overrides, "model": model_uri, "url": f"http://127.0.0.1:{port}/v1"}
    serve.shutdown()  # the next module's Serve starts its proxy on its own port


def _by_request(run) -> dict:
    return {(r.task, r.doc_id, r.context, r.continuation): r for r in run.requests}


def test_hf_backend_and_endpoint_give_the_same_accuracy_and_lmforges_loglikelihoods(endpoint):
    cfg, model_uri = endpoint["cfg"], endpoint["model"]
    store = ObjectStore(cfg.storage)
    hf = run_harness(cfg, store, model_uri, list(TASKS), log=print)
    api = run_harness(cfg, store, model_uri, list(TASKS), endpoint=endpoint["url"], log=print)
    assert (hf.backend, api.backend) == ("hf", "local-completions")
    assert hf.items == api.items == {task: LIMIT for task in TASKS}
    for task in TASKS:
        for metric in ("acc", "acc_norm") if task == "lmforge_who_speaks" else ("acc",):
            assert api.tasks[task][metric] == hf.tasks[task][metric], (task, metric)
    assert api.tasks["lmforge_cloze"]["perplexity"] == pytest.approx(hf.tasks["lmforge_cloze"]["perplexity"], rel=1e-5)
    assert len(hf.requests) == LIMIT + 4 * LIMIT  # a cloze request per item, one per choice of who-speaks
    # every request: the harness's answer on both backends equals lmforge's own Transformer's
    local = Path(store.local_path(model_uri))
    model, tok = load_model(local, dtype=torch.float32), BPETokenizer.load(local / "tokenizer.json")
    here, there = _by_request(hf), _by_request(api)
    assert here.keys() == there.keys()
    requests = list(here)
    ours = loglikelihoods(model, tok, [(context, continuation) for _, _, context, continuation in requests])
    worst = {}
    for name, answers in (("hf", here), ("endpoint", there)):
        diffs = [abs(answers[key].loglikelihood - ll) for key, (ll, _) in zip(requests, ours, strict=True)]
        assert [answers[key].is_greedy for key in requests] == [greedy for _, greedy in ours], name
        worst[name] = max(diffs)
        assert worst[name] < 1e-4, name
    print(f"harness: acc hf {hf.tasks} endpoint {api.tasks}; max |loglik diff| vs lmforge {worst}")
    # greedy agreement where there is some: the model's own greedy continuation, through both lm-eval backends
    context, new = "ROMEO:\nI", model.generate([tok.encode("ROMEO:\nI")], 4, temperature=0)[0]
    k = max(k for k in range(1, 5) if encode_pair(tok, context, tok.decode(new[:k]))[1] == new[:k])  # re-encodes
    pair = (context, tok.decode(new[:k]))
    (expected, greedy), = loglikelihoods(model, tok, [pair])
    assert greedy, pair
    (_, hf_args), (_, api_args) = (model_args(cfg, local, model.cfg.max_seq_len, url)
                                   for url in (None, endpoint["url"]))
    for backend, args in (("hf", {**hf_args, "device": "cpu"}), ("local-completions", api_args)):
        (ll, is_greedy), = get_model(backend)(**args).loglikelihood([Instance("loglikelihood", {}, pair, 0)])
        assert is_greedy and ll == pytest.approx(expected, abs=1e-4), backend
    assert hf.check.max_abs_diff < 1e-4 and api.check.max_abs_diff < 1e-4  # lm eval's own check says the same
    assert hf.check.greedy_disagreements == api.check.greedy_disagreements == 0


def test_cli_harness_on_the_endpoint_into_the_report_and_judged_by_rules(endpoint):
    rules = ("eval.compare=[{set: harness, metric: lmforge_cloze/acc, max_regression: 0.0}, "
             "{set: harness, metric: lmforge_who_speaks/acc, min_improvement: 0.01}]")
    done = subprocess.run([LM, "eval", "--harness", "lmforge_cloze,lmforge_who_speaks", "--endpoint", endpoint["url"],
                           "--model", endpoint["model"], "--compare", endpoint["model"], "-c", "configs/tiny.yaml",
                           *endpoint["overrides"], rules], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr  # the same model cannot improve by 0.01
    assert "harness/lmforge_who_speaks/acc" in done.stdout and "comparison FAILED" in done.stdout
    out = Path(endpoint["cfg"].eval.output)
    report = json.loads((out / "report.json").read_text())
    assert report["sets"] == {} and report["harness"]["backend"] == "local-completions"
    assert report["baseline"]["harness"]["backend"] == "hf"  # the baseline: the directory, through HF
    assert [c["passed"] for c in report["comparison"]["checks"]] == [True, False]
    assert report["harness"]["tasks"]["lmforge_cloze"]["acc"] == report["baseline"]["harness"]["tasks"][
        "lmforge_cloze"]["acc"]
    lines = (out / "harness_requests.jsonl").read_text().splitlines()
    assert len(lines) == 5 * LIMIT and "lm-evaluation-harness" in (out / "report.md").read_text()


@pytest.mark.s3
def test_a_model_directory_in_object_storage_is_downloaded_for_the_harness(endpoint, s3_server):
    cfg, model_uri = endpoint["cfg"], endpoint["model"]
    local = Path(ObjectStore(cfg.storage).local_path(model_uri))
    root = f"s3://{s3_server.new_bucket('harness')}"
    store = s3_server.store(root=root)
    store.publish_dir(local, f"{root}/model")
    run = run_harness(cfg, store, f"{root}/model", ["lmforge_cloze"], log=print)
    assert run.target == f"{root}/model" and run.items == {"lmforge_cloze": LIMIT}
    ours = loglikelihoods(load_model(local, dtype=torch.float32), BPETokenizer.load(local / "tokenizer.json"),
                          [(r.context, r.continuation) for r in run.requests])
    assert max(abs(r.loglikelihood - ll) for r, (ll, _) in zip(run.requests, ours, strict=True)) < 1e-4
