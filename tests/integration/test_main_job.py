"""The main job and the `lm` command end to end, through the real storage layer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lm.modeldir import load_model_dir
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]
LM = str(Path(sys.executable).parent / "lm")


def lm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([LM, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def local_run(tiny_run):
    return tiny_run.cfg, tiny_run.summary, tiny_run.lines


def test_main_job_trains_and_publishes(local_run):
    cfg, summary, lines = local_run
    store = ObjectStore(cfg.storage)
    # loss falls from ~ln(vocab) well below it
    assert summary["first_loss"] > 5.5 and summary["final_loss"] < summary["first_loss"] - 1.0
    assert summary["val_loss"] is not None and summary["val_loss"] < summary["first_loss"] - 1.0
    for rel in ("config.yaml", "data/manifest.json", "data/tokenizer.json", "train/metrics.jsonl", "train/loss.png",
                "samples.json", "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                "model/generation_config.json", "model/lineage.json"):
        assert store.exists(f"{cfg.run_uri}/{rel}"), rel
    assert store.read_bytes(f"{cfg.run_uri}/train/loss.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(line.startswith("sample:") for line in lines)
    assert isinstance(summary["sample"], str) and summary["sample"]
    # the evaluation report: the model's and the n-gram baseline's bits per byte on the val split
    assert summary["eval_report"] == f"{cfg.run_uri}/eval/report.md" and store.exists(summary["eval_report"])
    report = json.loads(store.read_text(f"{cfg.run_uri}/eval/report.json"))
    assert report["sets"]["val"]["model"]["bpb"] == pytest.approx(summary["eval"]["val/bpb"])
    assert 0 < summary["eval"]["val/bpb"] < 8 and 0 < summary["eval"]["val/ngram_bpb"] < 8


def test_saved_model_reproduces_sample(local_run):
    cfg, summary, _ = local_run
    from lm.inference import generate_text

    loaded = load_model_dir(ObjectStore(cfg.storage), summary["model_uri"])
    assert loaded.lineage["config_hash"] == cfg.fingerprint()
    again = generate_text(loaded.model, loaded.tokenizer, [cfg.generate.prompt], cfg.generate)[0]
    assert again == summary["sample"]  # seeded sampling


def test_cli_help_lists_subcommands():
    out = lm("--help")
    assert out.returncode == 0
    for name in ("run", "config", "tokenizer", "generate"):
        assert name in out.stdout


def test_cli_config_show_resolves_overrides():
    out = lm("config", "show", "-c", "configs/tiny.yaml", "model.n_layers=3", "storage.secret_access_key=s3cr3t")
    assert out.returncode == 0, out.stderr
    assert "n_layers: 3" in out.stdout and "s3cr3t" not in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("config tiny: hash ")


def test_cli_bad_config_fails_before_any_work(tmp_path):
    out = lm("run", "-c", "configs/tiny.yaml", f"storage.root={tmp_path}/store", "model.n_layerz=3")
    assert out.returncode == 2
    assert "override 'model.n_layerz=3': model.n_layerz: unknown key" in out.stderr
    assert not (tmp_path / "store").exists()
    out = lm("run", "-c", "configs/tiny.yaml", f"storage.root={tmp_path}/store", "data.sources.0.uri=/nope/x.txt")
    assert out.returncode == 2 and "/nope/x.txt" in out.stderr
    assert not (tmp_path / "store").exists()


def test_cli_train_honours_the_local_trainer(local_run, tmp_path):
    """`lm train train.trainer=local` trains in its own process on the prepared shards: no Ray Train run (it
    used to start Ray Train whatever the setting)."""
    cfg, _, _ = local_run
    out = lm("train", "-c", "configs/tiny.yaml", f"storage.root={tmp_path}", f"data.output={cfg.data_uri}",
             "train.trainer=local", "train.max_steps=6", "train.eval_interval=3")
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    run = tmp_path / "runs" / "tiny"
    assert json.loads((run / "model" / "lineage.json").read_text())["trainer"] == "local"
    assert not (run / "train" / "ray").exists() and (run / "train" / "metrics.jsonl").is_file()
    assert out.stdout.splitlines()[-1].startswith("train tiny: 6 steps")


def test_cli_tokenizer_train_and_generate(local_run, tmp_path):
    _, summary, _ = local_run
    root = tmp_path / "store"
    out = lm("tokenizer", "train", "-c", "configs/tiny.yaml", f"storage.root={root}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("tokenizer: 512 tokens") and (root / "runs/tiny/tokenizer/tokenizer.json").is_file()
    out = lm("generate", "-c", "configs/tiny.yaml", f"storage.root={root}", "--model", summary["model_uri"],
             "--prompt", "JULIET:", "generate.max_new_tokens=8")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("JULIET:")
    written = list((root / "runs/tiny/generations").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["prompt"] == "JULIET:"
    missing = lm("generate", "-c", "configs/tiny.yaml", f"storage.root={root}")
    assert missing.returncode == 2 and "no published model directory" in missing.stderr
