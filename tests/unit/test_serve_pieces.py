"""The Ray-free parts of serving: API keys, request schemas, the chat template, feedback batches, the
Serve config file."""

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lm.config import ConfigError, load_config
from lm.config.serve import KeyLimits
from lm.serve import schemas
from lm.serve.auth import grants, identify, load_api_keys
from lm.serve.feedback import FeedbackLog
from lm.serve.limits import Limiter
from lm.storage import ObjectStore

REPO = Path(__file__).parents[2]


def serve_cfg(*extra: str):
    return load_config(REPO / "configs/tiny.yaml", list(extra)).serve


A, B, C = "sk-env-a-0123456789ab", "sk-env-b-0123456789ab", "sk-file-0123456789abcd"


def test_api_keys_from_env_and_key_file_with_roles_and_limits(tmp_path):
    secret = tmp_path / "keys.yaml"
    secret.write_text(f"keys:\n  - {{name: ops, key: {C}, role: operator, requests_per_minute: 7}}\n")
    cfg = serve_cfg(f"serve.api_keys_file={secret}", "serve.key_limits.max_concurrent=4",
                    "serve.key_limits.requests_per_minute=100")
    keys = load_api_keys(cfg, {"LMFORGE_API_KEYS": f" {A}, {B} ,"})
    assert [k.name for k in keys] == ["$LMFORGE_API_KEYS[0]", "$LMFORGE_API_KEYS[1]", "ops"]
    table = grants(keys, cfg.key_limits, replicas=2)  # each of 2 ingress replicas enforces half, rounded up
    assert A not in table and all(len(d) == 64 for d in table)
    ops = table[identify(f"Bearer {C}", table)]
    assert ops.role == "operator" and (ops.limits.requests_per_minute, ops.limits.max_concurrent) == (4, 2)
    assert table[identify(f"Bearer {B}", table)].limits.requests_per_minute == 50
    assert identify("Bearer sk-env-c-0123456789ab", table) is None and identify(A, table) is None
    assert identify(None, table) is None and identify(None, {}) == ""  # "": auth off


@pytest.mark.parametrize("env, content, match", [
    ("", None, r"no API key is configured: set \$LMFORGE_API_KEYS"),
    (A, "absent", "does not exist"),
    (f"{A},short-key", None, r"\$LMFORGE_API_KEYS\[1\] is shorter than 16 characters"),
    ("REPLACE-ME-1-0000000000", None, r"\$LMFORGE_API_KEYS\[0\] is a placeholder"),
    ("", "keys:\n  - {name: bot, key: changeme-changeme-1}\n", r"bot in .*keys.yaml is a placeholder"),
    ("", "keys:\n  - {name: bot, key: sk-0123456789abcdef, rpm: 3}\n", r"keys.0.rpm: Extra inputs"),
    ("", "keys: [name: {key: sk-0123456789abcdef\n", r"keys.yaml: line \d+: not YAML"),
])
def test_bad_keys_fail_before_anything_starts_naming_where_never_the_key(tmp_path, env, content, match):
    extra = []
    if content is not None:
        path = tmp_path / "keys.yaml"
        if content != "absent":
            path.write_text(content)
        extra = [f"serve.api_keys_file={path}"]
    with pytest.raises(ConfigError, match=match) as err:
        load_api_keys(serve_cfg(*extra), {"LMFORGE_API_KEYS": env})
    assert "0123456789" not in str(err.value) and "changeme" not in str(err.value)


def test_the_shipped_placeholder_keys_are_refused():
    shipped = next(d for d in yaml.safe_load_all((REPO / "infra/secrets.yaml").read_text())
                   if d["metadata"]["name"] == "lmforge-api-keys")["stringData"]["LMFORGE_API_KEYS"]
    with pytest.raises(ConfigError, match=r"is a placeholder|shorter than 16"):
        load_api_keys(serve_cfg(), {"LMFORGE_API_KEYS": shipped})


def test_no_key_is_fine_only_without_auth():
    assert load_api_keys(serve_cfg("serve.require_auth=false"), {}) == []


def test_limiter_counts_requests_tokens_and_concurrency_per_key():
    limiter = Limiter({"a": KeyLimits(requests_per_minute=3, max_concurrent=2), "b": KeyLimits(tokens_per_minute=100)})
    assert limiter.admit("a", 0.0) is None and limiter.admit("a", 1.0) is None
    assert limiter.admit("a", 2.0) == (1.0, "2 concurrent requests")  # two in flight
    limiter.release("a", 10, 2.0)
    assert limiter.admit("a", 3.0) is None
    limiter.release("a", 10, 3.0)
    limiter.release("a", 10, 3.0)
    assert limiter.admit("a", 30.0) == (30.0, "3 requests per minute")  # the first start leaves the window at 60
    assert limiter.admit("a", 60.5) is None
    for t, used in ((0.0, 60), (10.0, 50)):
        assert limiter.admit("b", t) is None
        limiter.release("b", used, t)
    assert limiter.admit("b", 20.0) == (40.0, "100 tokens per minute")  # 110 used; 50 once the first 60 expire
    assert limiter.admit("b", 60.0) is None and limiter.admit("other", 0.0) is None


def test_serve_config_checks_batching_and_replica_bounds():
    assert serve_cfg("serve.max_batch_size=6").ongoing_requests == 12
    with pytest.raises(ConfigError, match="batches could never fill"):
        serve_cfg("serve.max_batch_size=8", "serve.max_ongoing_requests=4")
    with pytest.raises(ConfigError, match="exceeds max_replicas"):
        serve_cfg("serve.autoscaling.min_replicas=3")


def test_request_schemas_reject_bad_fields():
    ok = schemas.CompletionRequest(model="m", prompt=["a", "b"], stop="\n")
    assert ok.prompts() == ["a", "b"] and ok.stop_list() == ["\n"] and ok.max_tokens == 16
    for bad in ({"model": "m", "prompt": "a", "max_tokens": -1}, {"model": "m", "prompt": "a", "top_p": 0},
                {"model": "m", "prompt": "a", "extra": 1}, {"model": "m", "prompt": 5},
                {"model": "m", "prompt": "a", "presence_penalty": 2.5}, {"model": "m", "prompt": [[1], []]},
                {"model": "m", "prompt": [1, "a"]}, {"model": "m", "prompt": "a", "logit_bias": {"x": 1}},
                {"model": "m", "prompt": "a", "logit_bias": {"3": 100.5}}, {"model": "m", "prompt": [-1]}):
        with pytest.raises(ValidationError):
            schemas.CompletionRequest.model_validate(bad)
    ids = schemas.CompletionRequest(model="m", prompt=[[1, 2], [3]], logit_bias={"7": -100, "0": 2.5},
                                    frequency_penalty=-2, stream_options={"include_usage": True})
    assert ids.prompts() == [[1, 2], [3]] and ids.bias() == {7: -100.0, 0: 2.5} and ids.usage_chunk()
    assert schemas.CompletionRequest(model="m", prompt=[1, 2]).prompts() == [[1, 2]]
    chat = schemas.ChatRequest(model="m", messages=[{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                               max_completion_tokens=5)
    assert chat.token_budget(100) == 5
    assert schemas.chat_prompt(chat.messages) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    with pytest.raises(ValidationError, match=r"type \['image_url'\] are not supported"):
        schemas.ChatRequest(model="m", messages=[{"role": "user", "content": [
            {"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}])
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
