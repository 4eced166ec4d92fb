"""Evaluation on real shards: the Ray Data backend gives the local numbers; `lm eval` end to end,
including a comparison with a model that has another tokenizer."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lm.config import TokenizerConfig
from lm.data.documents import iter_documents
from lm.eval.evaluate import evaluate
from lm.modeldir import save_model_dir
from lm.storage import ObjectStore
from lm.tokenizer import train_tokenizer
from lm.train.weights import build_model

pytestmark = pytest.mark.ray

REPO = Path(__file__).parents[2]
LM = str(Path(sys.executable).parent / "lm")
SONNET = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n\n" * 30


def lm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([LM, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The session's tiny run (Ray Data shards, 60 Ray Train steps) and a small text file."""
    (tiny_run.root / "sonnet.txt").write_text(SONNET)
    output = f"eval.output={tiny_run.root}/eval-tests"  # the run's own report stays as the main job wrote it
    cfg = tiny_run.cfg.model_copy(
        update={"eval": tiny_run.cfg.eval.model_copy(update={"output": output.split("=")[1]})})
    return cfg, [*tiny_run.overrides, output], tiny_run.root


def quick(cfg, **changes):
    """``cfg`` scoring only the val split and a small text file (no generation metrics)."""
    sets = [{"name": "val", "split": "val"}, {"name": "sonnet", "uri": f"{cfg.storage.root}/sonnet.txt"}]
    update = {"sets": sets, "generation_set": None, "labelled_set": None, "prompts": [], **changes}
    return cfg.model_copy(update={"eval": cfg.eval.model_validate({**cfg.eval.model_dump(), **update})})


def test_ray_backend_gives_the_local_numbers(trained):
    cfg, _, root = trained
    store = ObjectStore(cfg.storage)
    local = evaluate(quick(cfg, backend="local", output=f"{root}/eval-local"), store, log=lambda _: None)
    distributed = evaluate(quick(cfg, backend="auto", ray_min_rows=1, actors=2, output=f"{root}/eval-ray"), store,
                           log=lambda _: None)
    for name in ("val", "sonnet"):  # val: Ray Data reads the shard files; sonnet: rows made on the driver
        here, there = local.report["sets"][name], distributed.report["sets"][name]
        assert (here["backend"], there["backend"]) == ("local", "ray")
        assert there["model"]["tokens"] == here["model"]["tokens"] and there["model"]["bytes"] == here["model"]["bytes"]
        assert there["model"]["accuracy"] == here["model"]["accuracy"]
        for key in ("loss", "bpb", "perplexity"):
            assert there["model"][key] == pytest.approx(here["model"][key], rel=1e-6)
            assert there["ngram"][key] == pytest.approx(here["ngram"][key], rel=1e-9)
    val = local.report["sets"]["val"]
    manifest = json.loads(store.read_text(f"{cfg.run_uri}/data/manifest.json"))
    assert val["rows"] == manifest["splits"]["val"]["rows"]
    assert val["model"]["tokens"] == val["rows"] * cfg.seq_len
    assert val["model"]["bpb"] < math.log2(512) * val["model"]["tokens"] / val["model"]["bytes"]  # it learned


@pytest.fixture(scope="module")
def other_model(trained):
    """An untrained model with a different tokenizer (400 tokens): only bits per byte compare."""
    cfg, _, root = trained
    store = ObjectStore(cfg.storage)
    texts = [d.text for _, d in zip(range(1500), iter_documents(store, cfg.data, "train"), strict=False)]
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400))
    model = build_model(cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 400})}), 400)
    uri = f"{root}/other-model"
    save_model_dir(store, uri, model, tok, cfg.generate, {"run": "other"})
    return uri


def test_cli_eval_compares_models_with_different_tokenizers(trained, other_model):
    cfg, overrides, _ = trained
    store = ObjectStore(cfg.storage)
    out = lm("eval", "-c", "configs/tiny.yaml", *overrides, "--compare", other_model)
    assert out.returncode == 0, out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("eval: val ") and "comparison PASSED" in last
    assert last.endswith(f"→ {cfg.eval.output}/report.md")
    report = json.loads(store.read_text(f"{cfg.eval.output}/report.json"))
    mine, theirs = report["sets"]["val"], report["baseline"]["sets"]["val"]
    assert "re-tokenized" in theirs["note"] and not mine["note"]
    # the same text either way: the re-tokenized split holds the val documents' bytes (less the last partial row)
    manifest = json.loads(store.read_text(f"{cfg.run_uri}/data/manifest.json"))
    assert 0.98 < theirs["model"]["bytes"] / manifest["splits"]["val"]["bytes"] <= 1.0
    # an untrained model is about uniform: log2(400) bits per token
    uniform = math.log2(400) * theirs["model"]["tokens"] / theirs["model"]["bytes"]
    assert theirs["model"]["bpb"] == pytest.approx(uniform, rel=0.03)
    assert mine["model"]["bpb"] < theirs["model"]["bpb"]
    assert report["comparison"]["passed"] and report["generation"]["examples"] == 4
    assert "training.png" in report["plots"]  # curves from the run's TensorBoard logs
    # the other way round the gate fails, with exit status 1; the baseline is the report just written
    kept = f"{cfg.storage.root}/trained-report.json"
    store.copy(f"{cfg.eval.output}/report.json", kept)
    out = lm("eval", "-c", "configs/tiny.yaml", *overrides, "eval.generation_set=null", "eval.labelled_set=null",
             "--model", other_model, "--compare", kept)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "comparison FAILED" in out.stdout and "FAIL val/bpb" in out.stdout


def test_cli_eval_text_source_and_bad_input(trained):
    cfg, overrides, root = trained
    out = lm("eval", "-c", "configs/tiny.yaml", *overrides, "eval.generation_set=null", "eval.labelled_set=null",
             "--text", f"{root}/sonnet.txt")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1].startswith("eval: text ")
    report = json.loads(ObjectStore(cfg.storage).read_text(f"{cfg.eval.output}/report.json"))
    assert list(report["sets"]) == ["text"] and report["sets"]["text"]["ngram"]["bpb"] > 0
    out = lm("eval", "-c", "configs/tiny.yaml", *overrides, "--text", "/nope/x.txt")
    assert out.returncode == 2 and "lm: error:" in out.stderr and "/nope/x.txt" in out.stderr
