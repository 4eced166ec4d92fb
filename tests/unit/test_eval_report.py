"""The whole evaluation on one process (a text set, no shards): report files exist and parse, TensorBoard
curves are read, a comparison with an earlier report.json is judged."""

import json
import math

import pytest
import torch

from lm.config import TokenizerConfig, load_config
from lm.data.sources import DataError
from lm.eval.evaluate import evaluate
from lm.eval.report import training_curves
from lm.modeldir import save_model_dir
from lm.storage import ObjectStore, StorageError
from lm.tokenizer import train_tokenizer
from lm.train.weights import build_model

PNG = b"\x89PNG\r\n\x1a\n"
TEXT = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\n") * 8


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a model directory (untrained tiny model) and a text file to evaluate."""
    root = tmp_path_factory.mktemp("store")
    (root / "sonnet.txt").write_text(TEXT)
    cfg = load_config("configs/tiny.yaml", [
        f"storage.root={root}", "tokenizer.vocab_size=300", "model.vocab_size=300",
        f"eval.sets=[{{name: sonnet, uri: {root}/sonnet.txt}}]", "eval.compare=[{set: sonnet, max_regression: 0}]",
        "eval.max_examples=6", "eval.max_new_tokens=6", "generate.max_new_tokens=8"])
    store = ObjectStore(cfg.storage)
    tok = train_tokenizer([TEXT], TokenizerConfig(vocab_size=300, min_frequency=1))
    model = build_model(cfg, tok.vocab_size)
    save_model_dir(store, f"{cfg.run_uri}/model", model, tok, cfg.generate, {"run": "tiny"})
    return cfg, store


def write_tensorboard(store, run_uri, tmp_path):
    from tensorboardX import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    for step in range(1, 6):
        writer.add_scalar("train/loss", 6.0 - step, step)
    writer.add_scalar("val/val_bpb", 3.5, 5)
    writer.close()
    store.upload_dir(tmp_path / "tb", f"{run_uri}/train/tensorboard")


def test_report_files_exist_and_parse(run, tmp_path):
    cfg, store = run
    assert training_curves(store, cfg.run_uri) == ({}, f"no training logs at {cfg.run_uri}/train/tensorboard or "
                                                       f"{cfg.run_uri}/train/metrics.jsonl")
    write_tensorboard(store, cfg.run_uri, tmp_path)
    lines = []
    result = evaluate(cfg, store, log=lines.append)
    out = f"{cfg.run_uri}/eval"
    assert result.report_uri == f"{out}/report.md" and lines[-1] == f"eval: report → {out}/report.md"
    report = json.loads(store.read_text(f"{out}/report.json"))
    assert report == json.loads(json.dumps(result.report))
    sonnet = report["sets"]["sonnet"]["model"]
    docs = [d for d in TEXT.split("\n\n") if d]  # documents on the set's delimiter; every byte is scored once
    assert sonnet["bytes"] == sum(len(d.encode()) for d in docs) and len(docs) == 16
    # an untrained model is close to uniform over its vocabulary
    assert sonnet["loss"] == pytest.approx(math.log(300), rel=0.02)
    assert report["sets"]["sonnet"]["ngram"] is None and "no n-gram baseline" in report["ngram"]["note"]
    assert report["generation"]["examples"] == 6 and 0 <= report["generation"]["bleu"] <= 100
    assert report["labels"]["examples"] == 6 and set(report["labels"]["per_label"]) == set(report["labels"]["labels"])
    assert [s["prompt"] for s in report["samples"]] == cfg.eval.prompts
    assert report["training"]["final"] == {"train/loss": 1.0, "val/val_bpb": 3.5}
    assert "TensorBoard" in report["training"]["note"]
    assert report["plots"] == ["metrics.png", "training.png"]
    for name in report["plots"]:
        assert store.read_bytes(f"{out}/{name}")[:8] == PNG
    md = store.read_text(f"{out}/report.md")
    assert "| set | tokens | bytes | loss | perplexity | bits/byte | top-1 acc |" in md
    assert f"| sonnet | {sonnet['tokens']:,} | {sonnet['bytes']:,} | {sonnet['loss']:.4f} |" in md
    assert "## Generation" in md and "## Labelled prompts" in md and "![training curves](training.png)" in md
    assert result.metrics["sonnet/bpb"] == sonnet["bpb"] and result.verdict is None


def test_comparison_with_an_earlier_report(run, tmp_path):
    cfg, store = run
    quick = {"generation_set": None, "labelled_set": None, "prompts": []}  # the test above covers them
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update=quick)})
    first = evaluate(cfg, store, log=lambda _: None)
    kept = f"{tmp_path}/before.json"
    store.copy(first.json_uri, kept)
    again = evaluate(cfg, store, log=lambda _: None, compare_to=kept)
    assert again.verdict.passed and again.verdict.deltas["sonnet/bpb"] == pytest.approx(0, abs=1e-9)
    report = json.loads(store.read_text(again.json_uri))
    assert report["comparison"]["passed"] and report["baseline"]["report"] == kept
    assert "comparison.png" in report["plots"]
    assert store.read_bytes(f"{cfg.run_uri}/eval/comparison.png")[:8] == PNG
    md = store.read_text(again.report_uri)
    assert "## Comparison with" in md and "- generation: skipped (not configured)" in md
    # a worse candidate fails the same rule: a model with its weights scrambled
    loaded_dir = f"{tmp_path}/worse"
    from lm.modeldir import load_model_dir

    loaded = load_model_dir(store, f"{cfg.run_uri}/model")
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(40.0)  # confident and wrong: far from uniform
    save_model_dir(store, loaded_dir, loaded.model, loaded.tokenizer, cfg.generate, {})
    worse = evaluate(cfg, store, model_uri=loaded_dir, log=lambda _: None, compare_to=f"{cfg.run_uri}/model")
    assert not worse.verdict.passed and worse.verdict.reasons[0].startswith("FAIL sonnet/bpb")


def test_bad_inputs_are_named(run, tmp_path):
    cfg, store = run
    missing = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"labelled_set": f"{tmp_path}/none.jsonl"})})
    with pytest.raises(FileNotFoundError, match=r"none\.jsonl"):
        evaluate(missing, store, log=lambda _: None)
    (tmp_path / "one.jsonl").write_text('{"prompt": "a", "label": "x"}\n')
    single = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"labelled_set": f"{tmp_path}/one.jsonl"})})
    with pytest.raises(DataError, match="at least 2 distinct labels"):
        evaluate(single, store, log=lambda _: None)
    with pytest.raises(StorageError, match="nowhere"):
        evaluate(cfg, store, model_uri=f"{tmp_path}/nowhere", log=lambda _: None)
