"""The console's pieces without Ray or a browser: the serving numbers (lm.serve.console.stats), what the
operators' view reads from storage (lm.serve.console.views), and the key file's operator role."""

import json

import pytest

from lm.config import ConfigError, join_uri, load_config
from lm.continual.ledger import Ledger
from lm.registry import Registry
from lm.serve.auth import OPERATOR, grant_of, grants, load_api_keys
from lm.serve.console import views
from lm.serve.console.stats import LiveStats, Tee, percentile
from lm.serve.gate import route_of
from lm.storage import ObjectStore

OPS, USER = "sk-ops-0123456789abcdef", "sk-user-0123456789abcde"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_percentiles_by_nearest_rank():
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (1, 50, 90, 99, 100)] == [1, 50, 90, 99, 100]
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 2.0], 50) == 1.0


def test_live_stats_count_requests_latency_tokens_and_cache_lookups():
    clock = Clock()
    stats, other = LiveStats(clock), LiveStats(clock)
    tee = Tee(stats, other)
    for ms in range(1, 11):
        tee.record("completions", 200, float(ms))
    tee.record("completions", 401, 0.5)
    tee.record("chat", 200, 30.0)
    greedy, seeded, sampled = {"temperature": 0.0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7}
    clock.now += 30
    stats.answered(40, [greedy, seeded, sampled], [{"cached": True}, {"cached": False}, {}])
    clock.now += 20
    stats.answered(20, [greedy], [{}])  # a streamed miss: its head says nothing about the cache
    snap = stats.snapshot()
    assert {(r["route"], r["status"]): r["count"] for r in snap["requests"]} == {
        ("chat", 200): 1, ("completions", 200): 10, ("completions", 401): 1}
    assert snap["latency_ms"]["completions"]["p50"] == 5.0 and snap["latency_ms"]["completions"]["samples"] == 11
    assert snap["latency_ms"]["chat"] == {"p50": 30.0, "p90": 30.0, "p99": 30.0, "samples": 1}
    assert snap["cache"] == {"hits": 1, "misses": 2, "hit_rate": pytest.approx(1 / 3)}  # sampled: no lookup
    assert snap["tokens_total"] == 60 and snap["tokens_per_s"] == pytest.approx(60 / 50)
    clock.now += 45  # the first answer's tokens have left the one-minute window
    assert stats.snapshot()["tokens_per_s"] == pytest.approx(20 / 60)
    assert other.snapshot()["cache"]["hit_rate"] is None and len(other.snapshot()["requests"]) == 3


def test_the_consoles_calls_have_their_own_route_tag():
    assert route_of("/v1/console/registry") == route_of("/api/v1/console/versions/v000001/plots/a.png") == "console"
    assert route_of("/v1/consoles") == "other" and route_of("/v1/completions") == "completions"


def test_the_key_file_has_an_operator_role_and_refuses_the_old_admin(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: ops, key: {OPS}, role: operator}}\n  - {{name: u, key: {USER}}}\n")
    cfg = load_config(None, [f"serve.api_keys_file={keys}"]).serve
    table = grants(load_api_keys(cfg, {}), cfg.key_limits)
    assert grant_of(f"Bearer {OPS}", table).role == OPERATOR and grant_of(f"Bearer {USER}", table).role == "user"
    assert grant_of("Bearer sk-nobody-0123456789ab", table) is None and grant_of(None, {}) is None
    keys.write_text(f"keys:\n  - {{name: ops, key: {OPS}, role: admin}}\n")
    with pytest.raises(ConfigError, match=r"keys\.0\.role") as err:
        load_api_keys(cfg, {})
    assert OPS not in str(err.value)


def _version_with_report(store: ObjectStore, reg: Registry, root: str) -> str:
    folder = f"{root}/continual/runs/i000001/eval"
    report = {"comparison": {"passed": False, "reasons": ["FAIL new/bpb"], "checks": []}, "baseline": {"uri": "m1"},
              "sets": {"new": {"model": {"bpb": 2.5, "loss": 1.7, "perplexity": 5.5, "accuracy": 0.3, "tokens": 9}}},
              "plots": ["comparison.png", "../../secret.png", "metrics.png"]}
    store.write_text(join_uri(folder, "report.json"), json.dumps(report))
    store.write_bytes(join_uri(folder, "comparison.png"), b"\x89PNG-comparison")
    return reg.register(f"{root}/runs/r2/model", parent="v000001", metrics={"new/bpb": 2.5},
                        gate_report=join_uri(folder, "report.md"), iteration=1).id


def test_views_read_the_registry_reports_ledger_and_curves(tmp_path):
    root = str(tmp_path)
    store = ObjectStore(load_config(None, [f"storage.root={root}"]).storage)
    reg = Registry(store, f"{root}/registry")
    v1 = reg.register(f"{root}/runs/r1/model", note="first")
    reg.promote(v1.id)
    v2 = _version_with_report(store, reg, f"{root}/registry")
    reg.reject(v2, reason="gate failed")
    shown = views.registry_view(reg)
    assert shown["aliases"] == {"production": "v000001"} and [v["id"] for v in shown["versions"]] == ["v000002", v1.id]
    assert shown["versions"][0]["status"] == "rejected" and shown["versions"][0]["parent"] == "v000001"
    report = views.report_view(store, reg.get(v2))
    assert report["comparison"]["passed"] is False and report["baseline"] == "m1"
    assert report["plots"] == ["comparison.png", "metrics.png"]  # a name that is not a plain PNG is dropped
    assert report["sets"]["new"] == {"bpb": 2.5, "loss": 1.7, "perplexity": 5.5, "accuracy": 0.3}
    assert views.plot_bytes(store, reg.get(v2), "comparison.png") == b"\x89PNG-comparison"
    with pytest.raises(views.NotFound):
        views.plot_bytes(store, reg.get(v2), "training.png")
    assert views.report_view(store, reg.get(v1.id))["plots"] == []  # no gate report
    ledger = Ledger(store, f"{root}/registry/continual")
    it = ledger.claim({"s3://b/feedback/a.jsonl": "e1"})
    ledger.finish(it["n"], {"verdict": "rejected", "version": v2, "reasons": ["FAIL new/bpb"], "secret": "x"})
    ledger.claim({"s3://b/feedback/b.jsonl": "e2"})  # still running
    its = views.iterations_view(store, f"{root}/registry")
    assert [i["n"] for i in its] == [2, 1] and its[0]["outcome"] is None
    assert its[1]["outcome"]["verdict"] == "rejected" and "secret" not in its[1]["outcome"]
    lines = [json.dumps({"step": s, "loss": 10.0 - s / 100}) for s in range(1000)]
    store.write_text(f"{root}/runs/r1/train/metrics.jsonl", "\n".join(lines))
    curves = views.training_view(store, reg.get("production"))
    assert curves["run"] == f"{root}/runs/r1" and list(curves["curves"]) == ["loss"]
    points = curves["curves"]["loss"]
    assert len(points) <= views.MAX_POINTS + 1 and points[0] == [0, 10.0] and points[-1] == [999, 10.0 - 999 / 100]


def test_the_run_of_a_model_comes_from_its_lineage(tmp_path):
    store = ObjectStore(load_config(None, [f"storage.root={tmp_path}"]).storage)
    store.write_text(f"{tmp_path}/m/lineage.json", json.dumps({"config": "s3://b/runs/x/train/config.json"}))
    assert views.run_uri_of(store, f"{tmp_path}/m") == "s3://b/runs/x"
    assert views.run_uri_of(store, f"{tmp_path}/runs/y/model") == f"{tmp_path}/runs/y"
