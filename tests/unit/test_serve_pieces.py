"""The Ray-free parts of serving: API keys, request schemas, the chat template, feedback batches, the
Serve config file."""

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lm.config import ConfigError, load_config
from lm.serve import schemas
from lm.serve.auth import authorized, key_digests, load_api_keys
from lm.serve.feedback import FeedbackLog
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]


def serve_cfg(*extra: str):
    return load_config(REPO / "configs/tiny.yaml", list(extra)).serve


def test_api_keys_from_env_and_file_checked_by_digest(tmp_path):
    secret = tmp_path / "keys"
    secret.write_text("# keys\nfile-key\n\n")
    keys = load_api_keys(serve_cfg(f"serve.api_keys_file={secret}"), {"LMFORGE_API_KEYS": " env-a, env-b ,"})
    assert keys == {"env-a", "env-b", "file-key"}
    digests = key_digests(keys)
    assert "env-a" not in digests and all(len(d) == 64 for d in digests)
    assert authorized("Bearer env-b", digests) and authorized("Bearer file-key", digests)
    assert not authorized("Bearer env-c", digests) and not authorized("env-a", digests) and not authorized(None, digests)
    assert authorized(None, frozenset())  # auth off


def test_missing_keys_fail_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"\$LMFORGE_API_KEYS"):
        load_api_keys(serve_cfg(), {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_api_keys(serve_cfg(f"serve.api_keys_file={tmp_path}/absent"), {"LMFORGE_API_KEYS": "k"})
    assert load_api_keys(serve_cfg("serve.require_auth=false"), {}) == frozenset()


def test_serve_config_checks_batching_and_replica_bounds():
    assert serve_cfg("serve.max_batch_size=6").ongoing_requests == 12
    with pytest.raises(ConfigError, match="batches could never fill"):
        serve_cfg("serve.max_batch_size=8", "serve.max_ongoing_requests=4")
    with pytest.raises(ConfigError, match="exceeds max_replicas"):
        serve_cfg("serve.autoscaling.min_replicas=3")


def test_request_schemas_reject_bad_fields():
    ok = schemas.CompletionRequest(model="m", prompt=["a", "b"], stop="\n")
    assert ok.prompts() == ["a", "b"] and ok.stop_list() == ["\n"] and ok.max_tokens == 16
    for bad in ({"model": "m", "prompt": "a", "max_tokens": 0}, {"model": "m", "prompt": "a", "top_p": 0},
                {"model": "m", "prompt": "a", "extra": 1}, {"model": "m", "prompt": 5},
                {"model": "m", "prompt": "a", "presence_penalty": 0.5}):
        with pytest.raises(ValidationError):
            schemas.CompletionRequest.model_validate(bad)
    chat = schemas.ChatRequest(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi"}], max_completion_tokens=5)
    assert chat.token_budget(100) == 5
    assert schemas.chat_prompt(chat.messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    with pytest.raises(ValidationError):
        schemas.FeedbackRequest(id="cmpl-abc", rating=5)
    assert not schemas.FeedbackRequest(id="cmpl-abc").has_content()


def test_feedback_batches_are_jsonl_objects_and_a_failed_write_keeps_them(tmp_path):
    store = ObjectStore(load_config(None, [f"storage.root={tmp_path}"]).storage)
    log = FeedbackLog(store, f"{tmp_path}/feedback", flush_records=2, writer="w1")
    log.add({"type": "completion", "id": "cmpl-1"})
    log.add({"type": "feedback", "id": "cmpl-1", "rating": 1})
    uri = log.flush()
    assert uri.startswith(f"{tmp_path}/feedback/") and uri.endswith("-000001.jsonl") and "/w1-" in uri
    lines = [json.loads(line) for line in store.read_text(uri).splitlines()]
    assert [r["type"] for r in lines] == ["completion", "feedback"] and all("time" in r for r in lines)
    assert log.flush() is None and log.written == 2
    broken = FeedbackLog(store, f"{tmp_path}/file.txt/under-a-file", writer="w2")
    (tmp_path / "file.txt").write_text("not a folder")
    broken.add({"type": "completion", "id": "cmpl-2"})
    assert broken.flush() is None and broken.written == 0  # kept for the next try
    broken.prefix = f"{tmp_path}/feedback2"
    assert broken.flush() and broken.written == 1


def test_feedback_flushes_in_the_background_of_an_event_loop(tmp_path):
    store = ObjectStore(load_config(None, [f"storage.root={tmp_path}"]).storage)

    async def scenario():
        log = FeedbackLog(store, f"{tmp_path}/fb", flush_interval_s=0.05, flush_records=100)
        log.add({"type": "completion", "id": "cmpl-9"})  # returns at once; the write happens later
        assert log.written == 0
        for _ in range(100):
            await asyncio.sleep(0.02)
            if log.written:
                break
        return log.written

    assert asyncio.run(scenario()) == 1 and len(store.list(f"{tmp_path}/fb")) == 1


def test_render_writes_a_serve_config_bound_to_loopback():
    from lm.serve.deploy import render

    cfg = load_config(REPO / "configs/tiny.yaml", ["serve.port=8123"])
    doc = yaml.safe_load(render(cfg, "configs/tiny.yaml", ["serve.port=8123"]))
    assert doc["http_options"] == {"host": "127.0.0.1", "port": 8123}
    app = doc["applications"][0]
    assert app["import_path"] == "lm.serve.app:app_builder"
    assert app["args"] == {"config": "configs/tiny.yaml", "overrides": ["serve.port=8123"]}
