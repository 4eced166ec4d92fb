"""Comparison verdicts against thresholds, and the eval config's validation."""

import pytest

from lm.config import ConfigError, load_config
from lm.config.eval import CompareRule
from lm.eval.compare import compare, flat_metrics

OLD = {"val/bpb": 2.50, "new/bpb": 3.00, "generation/bleu": 10.0}


def test_gate_rules_hold_set_within_tolerance_and_new_data_improves():
    rules = [CompareRule(set="val", metric="bpb", max_regression=0.02),
             CompareRule(set="new", metric="bpb", min_improvement=0.10)]
    ok = compare({"val/bpb": 2.515, "new/bpb": 2.80, "generation/bleu": 9.0}, OLD, rules)
    assert ok.passed and [r[:4] for r in ok.reasons] == ["PASS", "PASS"]
    assert ok.deltas == pytest.approx({"val/bpb": 0.015, "new/bpb": -0.2, "generation/bleu": -1.0})
    regressed = compare({"val/bpb": 2.53, "new/bpb": 2.80}, OLD, rules)
    assert not regressed.passed
    assert (regressed.reasons[0].startswith("FAIL val/bpb")
            and "regressed by 0.03 > allowed 0.02" in regressed.reasons[0])
    too_little = compare({"val/bpb": 2.40, "new/bpb": 2.95}, OLD, rules)
    assert not too_little.passed and "improved by 0.05 < required 0.1" in too_little.reasons[1]
    assert [c["passed"] for c in too_little.checks] == [True, False]


def test_direction_follows_the_metric_and_exact_tolerance_passes():
    bleu = [CompareRule(set="generation", metric="bleu", max_regression=0.5)]
    assert compare({"generation/bleu": 9.5}, OLD, bleu).passed  # exactly at the tolerance
    assert not compare({"generation/bleu": 9.4}, OLD, bleu).passed
    assert compare({"val/bpb": 2.5}, OLD, [CompareRule(max_regression=0.0)]).passed
    flipped = CompareRule(set="val", metric="bpb", min_improvement=0.1, higher_is_better=True)
    assert compare({"val/bpb": 2.6}, OLD, [flipped]).passed


def test_a_metric_missing_on_either_side_fails_its_rule():
    verdict = compare({"val/bpb": 2.0}, {}, [CompareRule(max_regression=1.0)])
    assert not verdict.passed and verdict.reasons == ["FAIL val/bpb: not measured for the baseline"]


def test_flat_metrics_of_a_report():
    report = {"sets": {"val": {"model": {"bpb": 2.0, "loss": 1.5}, "ngram": {"bpb": 2.4}}},
              "generation": {"bleu": 3.0, "examples": 40, "shown": [], "set": "builtin"},
              "labels": {"f1_macro": 0.5, "per_label": {}}}
    assert flat_metrics(report) == {"val/bpb": 2.0, "val/loss": 1.5, "val/ngram_bpb": 2.4, "generation/bleu": 3.0,
                                    "labels/f1_macro": 0.5}


def test_eval_config_rejects_bad_values_naming_them():
    cfg = load_config("configs/tiny.yaml", ['eval.compare=[{set: val, metric: bpb, max_regression: 0.01},'
                                            ' {set: labels, metric: f1_macro, min_improvement: 0}]'])
    assert [r.key for r in cfg.eval.compare] == ["val/bpb", "labels/f1_macro"]
    bad = {
        "eval.compare=[{set: val}]": "give max_regression and/or min_improvement",
        "eval.compare=[{set: nope, max_regression: 0.1}]": "unknown sets ['nope']",
        "eval.sets=[{name: a, split: val, uri: x.txt}]": "exactly one of split or uri",
        "eval.sets=[{name: generation, split: val}]": "reserved",
        "eval.sets=[{name: a, split: val}, {name: a, split: test}]": "unique",
        "eval.backend=gpu": "eval.backend",
        "eval.actor_cpus=0": "eval.actor_cpus",
        "eval.ngram_order=0": "eval.ngram_order",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match="eval") as err:
            load_config("configs/tiny.yaml", [override, "eval.compare=[]"] if "sets" in override else [override])
        assert message in str(err.value), (override, str(err.value))
