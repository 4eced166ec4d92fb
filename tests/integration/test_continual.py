"""Continuous learning end to end on the shared local Ray cluster and the real SeaweedFS S3 server:
a base model trained on three quarters of tinyshakespeare is v1 in the registry and served by Ray
Serve from ``registry:production``; served completions, their feedback and the last quarter of the
corpus (new documents) feed an iteration on Ray Train + DeepSpeed that is killed during fine-tuning on 2
workers, resumed from its checkpoint on 1 (optimizer state and all, not from the production weights again),
gated and promoted while clients keep calling (no failed request, answers move to v2), then rolled back;
an e-mail address, a phone number and API keys sent to Serve are nowhere in storage nor in the training rows;
garbage (random bytes, repeated junk, gibberish) is rejected and production stays."""

import contextlib
import gzip
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from serving import KEY, free_port, settles_on, under_load
from training import optimizer_counts, ray_train_processes

from lm.config import load_config
from lm.continual.iteration import continual_uri, iteration_uri, run_iteration
from lm.continual.ledger import Ledger
from lm.registry import Registry
from lm.train.resume import TrainerState

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

REPO = Path(__file__).parents[2]
TINY = REPO / "configs/tiny.yaml"
# what users typed that must never be stored (serve.feedback redacts before writing; issue 23)
EMAIL, PHONE, AWS_KEY = "juliet.capulet@verona.example", "+39 045 803 4217", "AKIAIOSFODNN7EXAMPLE"
PRIVATE = (EMAIL, PHONE, AWS_KEY, KEY)  # KEY: the server's own API key


@pytest.fixture(scope="module")
def loop(ray_session, s3_server, monkeypatch_module):
    """The corpus, the base model (v1, production) and the config every test of the loop shares."""
    from lm.pipeline import run_main

    for key, value in s3_server.env().items():
        monkeypatch_module.setenv(key, value)
    monkeypatch_module.setenv("LMFORGE_API_KEYS", KEY)
    root = f"s3://{s3_server.new_bucket('loop')}"
    store = s3_server.store(root=root)
    speeches = gzip.decompress((REPO / "lm/corpora/tinyshakespeare.txt.gz").read_bytes()).decode().split("\n\n")
    cut = int(len(speeches) * 0.75)
    store.write_text(f"{root}/corpus/shakespeare-a.txt", "\n\n".join(speeches[:cut]))
    port = free_port()
    overrides = [f"storage.root={root}", f"data.sources=[{{name: shakespeare, uri: '{root}/corpus/'}}]",
                 f"continual.corpus=[{{name: incoming, uri: '{root}/incoming/'}}]",
                 "train.max_steps=400", "train.trainer=local", "train.eval_interval=10", "train.workers=1",
                 "train.cpus_per_worker=0.5", "continual.steps=30", "continual.lr=1e-3",
                 "eval.generation_set=null", "eval.labelled_set=null", 'eval.prompts=["ROMEO:"]',
                 "eval.max_batches=24", "eval.ngram_max_train_tokens=100000",
                 f"serve.port={port}", "serve.replica_cpus=0.5", "serve.autoscaling.max_replicas=1",
                 "serve.model=registry:production", "serve.registry_poll_s=0.5",
                 "serve.feedback.enabled=true", "serve.feedback.flush_interval_s=0.5"]
    cfg = load_config(TINY, overrides)
    run_main(cfg, store, log=lambda line: None)
    registry = Registry(store, cfg.registry_uri)
    v1 = registry.register(f"{root}/runs/tiny/model", note="base: 3/4 of tinyshakespeare")
    registry.promote(v1.id, reason="base model")
    yield {"cfg": cfg, "overrides": overrides, "store": store, "root": root, "registry": registry, "v1": v1.id,
           "later": speeches[cut:], "base": f"http://127.0.0.1:{port}/v1",
           "ray_address": ray_session.get_runtime_context().gcs_address}
    from ray import serve

    serve.shutdown()  # the next module's Serve starts its proxy on its own port


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def continual_job(loop, *extra: str) -> subprocess.Popen:
    """``python jobs/continual.py`` on the shared cluster (as `ray job submit` would run it), in its own
    process group so that it can be killed."""
    env = {**os.environ, "RAY_ADDRESS": loop["ray_address"]}
    return subprocess.Popen([sys.executable, "jobs/continual.py", "-c", str(TINY), *loop["overrides"], *extra],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def committed_checkpoint(store, run_uri: str) -> bool:
    """Whether Ray Train has committed a checkpoint of the run (its checkpoint manager's snapshot names one):
    from then on, a new run of the same name restores from it."""
    uri = f"{run_uri}checkpoint_manager_snapshot.json"
    return store.exists(uri) and json.loads(store.read_text(uri)).get("latest_checkpoint_result") is not None


def latest_checkpoint(store, run_uri: str) -> tuple[str, TrainerState]:
    """The URI and the state of the latest checkpoint Ray Train has committed for the run (what it resumes)."""
    latest = json.loads(store.read_text(f"{run_uri}checkpoint_manager_snapshot.json"))["latest_checkpoint_result"]
    uri = f"{run_uri}{latest['checkpoint_dir_name']}"
    return uri, TrainerState.model_validate(json.loads(store.read_text(f"{uri}/trainer_state.json")))


def check_lineage(cfg, store, v2: str, v1: str, claimed: dict, response_id: str) -> None:
    """``lm lineage`` of the continual version: its gate report, the ledger's inputs (feedback logs and the new
    document), the new documents' source object, the replayed data, the parent's chain down to its source; every
    hash verifies. A served response leads to v1."""
    from lm.lineage import all_checks, build_chain, verify_chain

    chain = verify_chain(store, build_chain(cfg, store, v2))
    assert chain.version.parent == v1 and chain.version.iteration == 1 and chain.version.gate_report.endswith(".md")
    assert chain.continual.inputs == claimed and chain.continual.parent.version.id == v1
    assert chain.data.kind == "continual-mix" and all(s.sha256 for s in chain.data.shards)
    new = chain.data.parts["new"].sources["incoming"]
    assert [o.uri for o in new] == [f"{cfg.storage.root}/incoming/shakespeare-b.txt"] and new[0].etag
    assert chain.continual.parent.data.sources and "replay" in chain.data.parts
    checks = all_checks(chain)
    assert len(checks) > 10 and all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert build_chain(cfg, store, response_id).version.id == v1


def wait_for(predicate, timeout: float, what: str, every: float = 0.3) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_feedback_and_new_documents_become_v2_in_serving_after_a_killed_and_resumed_iteration(loop):
    from ray import serve

    from lm.serve.deploy import start

    cfg, store, registry, root = loop["cfg"], loop["store"], loop["registry"], loop["root"]
    start(cfg)
    client = openai.OpenAI(base_url=loop["base"], api_key=KEY, max_retries=0)
    try:
        # served traffic and what users said about it
        prompts = ["ROMEO:\n", "JULIET:\n", "KING RICHARD III:\n", f"First Citizen: {EMAIL} {KEY}\n",
                   "MENENIUS:\n", "GLOUCESTER:\n"]
        answers = [client.completions.create(model="lmforge", prompt=p, max_tokens=12, temperature=0) for p in prompts]
        assert {a.system_fingerprint for a in answers} == {loop["v1"]}
        for i, a in enumerate(answers):
            correction = f"Call {PHONE}, key {AWS_KEY}." if i == 3 else "Good morrow, my lord; what news?"
            body = {"id": a.id, "correction": correction} if i % 2 else {"id": a.id, "rating": 1}
            r = httpx.post(f"{loop['base']}/feedback", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 200, r.text

        def all_feedback_written() -> bool:
            lines = [json.loads(x) for u in store.list(cfg.feedback_uri + "/") for x in store.read_text(u).splitlines()]
            return sum(r["type"] == "feedback" for r in lines) == len(prompts)

        wait_for(all_feedback_written, 30, "the feedback logs")
        store.write_text(f"{root}/incoming/shakespeare-b.txt", "\n\n".join(loop["later"][: len(loop["later"]) // 2]))

        # the iteration on Ray Train + DeepSpeed on 2 workers, killed (its Ray Train processes first) once it has a
        # checkpoint (the global batch fixed: 8 micro-batches a step on each of 2 workers, 16 on 1; every step's
        # loss in the history). Ray Train commits a checkpoint at its controller's next poll, after the upload
        # that runs while training goes on: steps of 1 micro-batch (ms each) ran all 30 and published the
        # model before the kill could land; with 8 the kill lands a step or two after the checkpoint.
        ray_train = ["train.trainer=ray", "train.global_batch_tokens=8192", "train.log_interval=1"]
        job = continual_job(loop, *ray_train, "train.workers=2")
        killed: list[str] = []
        reader = threading.Thread(target=lambda: killed.extend(job.stdout), daemon=True)  # a full pipe blocks it
        reader.start()
        checkpoints = f"{iteration_uri(cfg, 1)}/train/ray/"
        try:
            wait_for(lambda: committed_checkpoint(store, checkpoints), 300, "a committed fine-tuning checkpoint", 0.05)
        except AssertionError:
            os.killpg(job.pid, signal.SIGKILL)
            reader.join(timeout=10)
            raise AssertionError(f"no checkpoint; the job said:\n{''.join(killed)[-6000:]}") from None
        for process in ray_train_processes():  # at once: the workers would train on, even publish the model
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # the job prints what the workers had printed
            job.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        reader.join(timeout=10)
        wait_for(lambda: not ray_train_processes(), 60, "the killed fine-tune's Ray Train processes to end")
        assert not store.is_published(f"{iteration_uri(cfg, 1)}/model"), "the fine-tune ended before the kill"
        _, saved = latest_checkpoint(store, checkpoints)  # what the next run resumes from
        assert saved.world_size == 2 and 0 < saved.step < 30, saved.step
        ledger = Ledger(store, continual_uri(cfg))
        assert ledger.open_iteration()["n"] == 1
        claimed = ledger.iterations()[0]["inputs"]
        assert f"{root}/incoming/shakespeare-b.txt" in claimed
        assert sum(u.startswith(cfg.feedback_uri) for u in claimed) >= 1

        # run again, on 1 worker (train.workers=1 of the loop's overrides), while clients keep calling: the
        # fine-tune resumes from its checkpoint, universal, promotes v2, and serving moves to it
        with under_load(client, "ROMEO:", 4, 0.7, threads=1) as (fingerprints, errors):
            assert settles_on(fingerprints, loop["v1"])
            job = continual_job(loop, *ray_train)
            out, _ = job.communicate(timeout=600)
            assert job.returncode == 0, out[-3000:]
            assert "resuming iteration 1" in out, out[-3000:]
            resumed = re.findall(r"resumed at step (\d+) (.*)", out)
            assert resumed == [(str(saved.step), "on 1 worker instead of 2 (universal checkpoint)")], (
                resumed, [line for line in out.splitlines() if "step" in line])
            outcome = ledger.iterations()[0]["outcome"]
            assert outcome["verdict"] == "promoted", outcome
            v2 = outcome["version"]
            assert registry.get("production").id == v2 and registry.get(v2).parent == loop["v1"]
            assert settles_on(fingerprints, v2), fingerprints[-6:]
            registry.rollback(reason="test: rollback puts v1 back into serving")
            assert settles_on(fingerprints, loop["v1"]), fingerprints[-6:]
        assert not errors, errors[:3]
        check_lineage(cfg, store, v2, loop["v1"], claimed, answers[0].id)
    finally:
        serve.delete(cfg.serve.app_name)

    # what it learned from, once
    assert outcome["rows"]["new"] > 0 and outcome["rows"]["sft"] > 0 and outcome["rows"]["replay"] > 0
    assert outcome["counts"]["feedback"]["kept: correction"] == 3
    assert outcome["counts"]["feedback"]["kept: rated good"] == 3
    assert any(r.startswith("PASS fixed/bpb") for r in outcome["reasons"])
    assert any(r.startswith("PASS new/bpb") for r in outcome["reasons"])
    history = [json.loads(x) for x in store.read_text(f"{iteration_uri(cfg, 1)}/train/metrics.jsonl").splitlines()]
    assert [h["step"] for h in history] == list(range(1, 31))  # one curve across the restart, each step once
    assert [h["step"] for h in history if "val_loss" in h] == [10, 20, 30]
    # up to the checkpoint, its history (timings too: a fine-tune from init_from again would measure anew);
    # after it, the losses the killed run printed for the steps it went on to (the same rows, 1 worker for 2)
    assert history[:saved.step] == saved.history
    printed = {int(m[1]): float(m[2]) for m in re.finditer(r"step\s+(\d+)/30 loss (\S+)", "".join(killed))}
    assert saved.step in printed, sorted(printed)
    print(f"killed after step {saved.step} on 2 workers; its printed steps {min(printed)}-{max(printed)} against the "
          "resumed curve:",
          " ".join(f"{abs(history[s - 1]['loss'] - loss):.1e}" for s, loss in sorted(printed.items())))
    assert {s: round(history[s - 1]["loss"], 4) for s in printed} == pytest.approx(printed, abs=5e-4)
    # the optimizer came back: Adam's step count and the LR schedule went on from the checkpoint's (after a resume
    # of the weights alone they would stand at 30 - step)
    final, state = latest_checkpoint(store, checkpoints)
    assert state.step == 30 and state.world_size == 1
    assert optimizer_counts(store, final) == ({30}, 30, 30)
    assert registry.get(v2).status == "rejected" and "rolled back" in registry.get(v2).reason
    seen = [u for it in ledger.iterations() for u in it["inputs"]]
    assert len(seen) == len(set(seen))
    assert_never_stored(store, root, f"{iteration_uri(cfg, 1)}/mix")


def assert_never_stored(store, root: str, mix_uri: str) -> None:
    """None of PRIVATE is in any object of the bucket (Parquet read as tables) nor in the iteration's training
    rows (decoded), while their placeholders are: the feedback logs were redacted before they were written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lm.data.manifest import read_manifest
    from lm.data.stream import ParquetSplit, read_head
    from lm.tokenizer import BPETokenizer

    placeholders = 0
    for uri in store.list(root):
        if uri.endswith("/"):  # a folder marker
            continue
        blob = store.read_bytes(uri)
        if uri.endswith(".parquet"):
            blob = str(pq.read_table(pa.BufferReader(blob)).to_pylist()).encode()
        assert not [p for p in PRIVATE if p.encode() in blob], uri
        placeholders += b"<EMAIL>" in blob
    assert placeholders >= 1  # the feedback logs (and the iteration's copies) hold the redacted texts
    tok = BPETokenizer.from_json(store.read_text(f"{root}/runs/tiny/model/tokenizer.json"))
    texts = []
    for split in read_manifest(store, mix_uri).splits:
        data = ParquetSplit.open(store, mix_uri, split)
        texts += [tok.decode(row.tolist()) for row in read_head(data, data.rows)[0]]
    joined = "\n".join(texts)
    assert texts and not [p for p in PRIVATE if p in joined]



WORDS = ["river", "stone", "garden", "window", "morning", "letter", "silver", "harbour", "lantern", "meadow",
         "ticket", "engine", "basket", "orchard", "thunder", "pocket", "village", "candle", "compass", "feather"]


def validation_words(cfg, store, n: int) -> str:
    """``n`` words of one document of the corpus's validation split (its shards, decoded)."""
    from lm.data.stream import ParquetSplit, read_head
    from lm.tokenizer import BPETokenizer

    tok = BPETokenizer.from_json(store.read_text(f"{cfg.data_uri}/tokenizer.json"))
    rows, _ = read_head(ParquetSplit.open(store, cfg.data_uri, "val"), 64)
    docs = [d.split() for d in tok.decode(rows.reshape(-1).tolist()).split(tok.eos_token)[1:-1]]
    return " ".join(max(docs, key=len)[:n])


def test_garbage_is_rejected_and_production_stays(loop):
    cfg, store, registry, root = loop["cfg"], loop["store"], loop["registry"], loop["root"]
    production = registry.get("production").id
    lines: list[str] = []

    # random bytes and repeated junk: nothing survives cleaning, so there is nothing to learn
    store.write_bytes(f"{root}/incoming/random.bin", random.Random(0).randbytes(30_000))
    store.write_text(f"{root}/incoming/junk.txt", "\n\n".join("BUY NOW buy now CLICK HERE " * 50 for _ in range(40)))
    # a new text quoting 16 words of the corpus's validation split, the gate's fixed set: not learned
    rng = random.Random(2)
    filler = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(16)]
    leak = [*filler[:8], validation_words(cfg, store, 16), *filler[8:]]
    store.write_text(f"{root}/incoming/leak.txt", "\n".join(leak))
    first = run_iteration(cfg, store, log=lines.append)
    assert first["verdict"] == "rejected" and "no new data to learn from" in first["reasons"][0], first
    assert "1 contaminated" in first["counts"]["documents_note"], first["counts"]
    assert ("1 objects skipped" in first["counts"]["documents_note"]
            or "skipped objects: 1" in first["counts"]["documents_note"])
    assert registry.get("production").id == production

    # gibberish that reads as text passes cleaning, is learned, and the gate sees the forgetting
    rng = random.Random(1)
    symbols = string.ascii_letters + string.digits + "#$%&*+<=>@[]^_{|}~"
    gibberish = ["\n".join(" ".join("".join(rng.choice(symbols) for _ in range(rng.randint(2, 9))) for _ in range(12))
                           for _ in range(6)) for _ in range(150)]
    store.write_text(f"{root}/incoming/gibberish.txt", "\n\n".join(gibberish))
    second = run_iteration(cfg, store, log=lines.append)
    assert second["verdict"] == "rejected", second
    assert any(r.startswith("FAIL fixed/bpb") for r in second["reasons"]), second["reasons"]
    assert all(sum(reason in line for line in lines) == 1 for reason in second["reasons"]), lines  # printed once
    assert registry.get(second["version"]).status == "rejected"
    assert registry.get("production").id == production
    again = run_iteration(cfg, store, log=lines.append)
    assert again["verdict"] == "nothing new"  # every input was taken once, whatever its verdict
