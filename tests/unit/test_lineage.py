"""Provenance pieces without Ray (issue 23): the source objects a manifest records and how a change to one is
found, the code commit handed to the workers, Serve's response records (metadata only) and looking one up."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from lm.config import StorageConfig
from lm.data.objects import check_object, source_objects
from lm.lineage import LineageError, find_response
from lm.serve.feedback import FeedbackLog, JsonlBatches
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]


def test_local_source_objects_record_size_mtime_and_hash_and_a_rewrite_is_found(tmp_path):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("first document")
    b.write_text("second")
    files = [{"uri": str(a), "source": "web", "size": 14}, {"uri": str(b), "source": "web", "size": 6},
             {"uri": "bundled://sonnets", "source": "poems", "size": -1}]
    objects = source_objects(store, files)
    (oa, ob), (sonnets,) = objects["web"], objects["poems"]
    assert oa.uri == str(a) and oa.size == 14 and oa.mtime == a.stat().st_mtime and oa.etag is None
    assert oa.sha256 == hashlib.sha256(b"first document").hexdigest()
    gz = REPO / "lm/corpora/sonnets.txt.gz"  # bundled: the file shipped in the package
    assert sonnets.uri == "bundled://sonnets" and sonnets.sha256 == hashlib.sha256(gz.read_bytes()).hexdigest()
    assert check_object(store, oa) == "" and check_object(store, sonnets) == ""
    a.write_text("FIRST DOCUMENT")  # same size, other bytes
    assert check_object(store, oa).startswith("sha256 ")
    b.unlink()
    assert check_object(store, ob).startswith("cannot be read now")


def test_code_commit_comes_from_the_environment_else_the_checkout(monkeypatch):
    from lm.cluster import worker_env
    from lm.provenance import COMMIT_ENV, code_commit

    monkeypatch.setenv(COMMIT_ENV, "abc123-from-the-submitter")
    assert code_commit() == "abc123-from-the-submitter" and worker_env()[COMMIT_ENV] == "abc123-from-the-submitter"
    monkeypatch.delenv(COMMIT_ENV)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert code_commit().split("-")[0] == head and worker_env()[COMMIT_ENV] == code_commit()


def test_response_records_hold_metadata_only_and_are_found_by_id(tmp_path):
    store = ObjectStore(StorageConfig(root=str(tmp_path)))
    prefix = f"{tmp_path}/responses"
    log = JsonlBatches(store, prefix, writer="w1")
    for i in range(3):
        log.add({"type": "completion", "id": f"cmpl-{i}", "model_version": "v000002", "model_uri": "/m/v2"})
    log.flush()
    JsonlBatches(store, prefix, writer="w2").add({"type": "chat", "id": "chatcmpl-x", "model_version": "v1"})
    found = find_response(store, prefix, "cmpl-1")
    assert (found.id, found.type, found.model_version, found.model_uri) == ("cmpl-1", "completion", "v000002", "/m/v2")
    assert found.time > 0 and found.log.startswith(prefix)
    with pytest.raises(LineageError, match="chatcmpl-x"):  # never flushed: not there
        find_response(store, prefix, "chatcmpl-x")
    # feedback capture still redacts; the response log is a plain batch writer with no content to redact
    fb = FeedbackLog(store, f"{tmp_path}/fb", writer="w")
    fb.add({"type": "completion", "id": "cmpl-9", "model_version": "v1", "prompts": ["mail me at a@b.example"]})
    uri = fb.flush()
    assert "<EMAIL>" in json.loads(store.read_text(uri))["prompts"][0]


def test_a_response_id_leads_to_its_version_run_and_shards_and_verify_finds_a_change(tmp_path, small_tokenizer,
                                                                                     small_model, write_manifest):
    from lm.config import load_config
    from lm.data.manifest import read_manifest
    from lm.lineage import all_checks, build_chain, verify_chain
    from lm.lineage_text import chain_lines
    from lm.provenance import code_commit
    from lm.registry import Registry
    from lm.train.publish import RunFacts, publish_run

    cfg = load_config(REPO / "configs/tiny.yaml", [f"storage.root={tmp_path}"])
    store = ObjectStore(cfg.storage)
    shard = tmp_path / "shard.parquet"
    shard.write_bytes(b"rows of tokens")
    write_manifest(store, cfg.data_uri, [{"path": str(shard), "split": "train", "rows": 1,
                                          "sha256": hashlib.sha256(b"rows of tokens").hexdigest()}],
                   small_tokenizer, 64, kind="text")
    history = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0, "val_loss": 4.5}]
    manifest = read_manifest(store, cfg.data_uri)
    model_uri = publish_run(store, cfg, small_model(small_tokenizer), small_tokenizer, manifest, history,
                            RunFacts(tokens=64, trainer="local"))
    registry = Registry(store, cfg.registry_uri)
    v1 = registry.register(model_uri)
    registry.promote(v1.id)
    log = JsonlBatches(store, cfg.responses_uri)
    log.add({"type": "chat", "id": "chatcmpl-unit", "model_version": v1.id, "model_uri": model_uri})
    log.flush()

    chain = verify_chain(store, build_chain(cfg, store, "chatcmpl-unit"))
    assert chain.response.model_version == v1.id and chain.version.id == v1.id and chain.run.model_uri == model_uri
    assert (chain.run.steps, chain.run.seed, chain.data.shards[0].uri) == (2, cfg.train.seed, str(shard))
    assert chain.run.code_commit == code_commit()
    checks = all_checks(chain)
    assert {c.what.split(" ")[0] for c in checks} == {"model", "config", "shard"} and all(c.ok for c in checks)
    text = "\n".join(chain_lines(chain))
    assert text.startswith("response chatcmpl-unit (chat, ") and f"version {v1.id} (production)" in text
    assert build_chain(cfg, store, "production").run == chain.run == build_chain(cfg, store, model_uri).run

    shard.write_bytes(b"rows of tokenz")
    (tmp_path / "runs/tiny/train/config.json").write_text("{}")
    failed = [c for c in all_checks(verify_chain(store, build_chain(cfg, store, v1.id))) if not c.ok]
    assert [c.what for c in failed] == [f"config hash ({cfg.run_uri}/train/config.json)", f"shard {shard}"]
    with pytest.raises(LineageError, match="cmpl-nowhere"):
        build_chain(cfg, store, "cmpl-nowhere")
