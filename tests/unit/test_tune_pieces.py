"""The Ray-free parts of lm.tune: search-space validation, trial configs, concurrency, results."""

import json
from pathlib import Path

import pytest
import yaml

from lm.config import ConfigError, load_config
from lm.storage import ObjectStore
from lm.tune.results import TrialRecord, best_config, config_yaml, curves_png, results_table
from lm.tune.sweep import check_sweep, search_space, trial_config, trials_at_once

REPO = Path(__file__).parents[2]


def tiny(*extra: str):
    return load_config(REPO / "configs/tiny.yaml", list(extra))


def space(value: dict) -> str:
    return f"tune.space={json.dumps(value)}"


def test_space_values_are_checked_against_the_schema_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"tune.space.train.lr.grid: .*train.lr.*greater than 0"):
        tiny(space({"train.lr": {"grid": [0.01, -1]}}))
    with pytest.raises(ConfigError, match=r"tune.space.train.lrr.*unknown key"):
        tiny(space({"train.lrr": {"grid": [0.01]}}))
    with pytest.raises(ConfigError, match="exactly one of"):
        tiny(space({"train.lr": {"grid": [0.01], "choice": [0.1]}}))
    with pytest.raises(ConfigError, match="low must be below high"):
        tiny("tune.search=random", space({"train.lr": {"uniform": [0.1, 0.01]}}))
    with pytest.raises(ConfigError, match="loguniform: low must be > 0"):
        tiny("tune.search=random", space({"train.lr": {"loguniform": [0, 0.01]}}))
    with pytest.raises(ConfigError, match="optuna cannot take grid"):
        tiny("tune.search=optuna", space({"train.lr": {"grid": [0.01]}}))
    with pytest.raises(ConfigError, match="grid dimensions only"):
        tiny(space({"train.lr": {"choice": [0.01]}}))


def test_listed_values_are_typed_as_the_schema_types_them():
    cfg = tiny(space({"train.lr": {"grid": ["2e-5", 0.01]}}), "train.min_lr=0.000001")  # YAML reads 2e-5 as text
    assert cfg.tune.space["train.lr"].grid == [2e-5, 0.01]


def test_search_space_maps_each_kind_to_ray_tune():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = tiny("tune.search=random", space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": {"randint": [0, 9]},
                                            "model.dropout": {"choice": [0.0, 0.1]},
                                            "train.batch_size": {"grid": [8, 16]}}))
    ray_space = search_space(cfg.tune.space)
    assert isinstance(ray_space["train.lr"], Float) and ray_space["train.lr"].lower == 1e-4
    assert isinstance(ray_space["train.seed"], Integer) and ray_space["train.seed"].upper == 9
    assert isinstance(ray_space["model.dropout"], Categorical)
    assert ray_space["train.batch_size"] == {"grid_search": [8, 16]}


def test_a_trial_config_sets_its_values_and_keeps_the_sweeps_data(tmp_path):
    base = tiny(f"storage.root={tmp_path}", "name=sw", space({"train.lr": {"grid": [0.01]}})).with_absolute_paths()
    cfg = trial_config(base, {"train.lr": 0.01, "model.dropout": 0.2}, "abc_00001", f"{base.run_uri}/tune/trials")
    assert cfg.train.lr == 0.01 and cfg.model.dropout == 0.2 and not cfg.tune.space
    assert cfg.run_uri == f"{tmp_path}/runs/sw/tune/trials/abc_00001" and cfg.data.output == f"{tmp_path}/runs/sw/data"
    with pytest.raises(ConfigError, match=r"trial abc_00002: train.batch_size"):
        trial_config(base, {"train.batch_size": 0}, "abc_00002", "x")


def test_a_dimension_that_changes_the_data_is_refused_before_any_work(tmp_path):
    store = ObjectStore(tiny().storage)
    with pytest.raises(ConfigError, match=r"tune\.space is empty"):
        check_sweep(tiny(), store)
    with pytest.raises(ConfigError, match=r"tune.space.data.val_fraction: 0.2 changes the prepared data"):
        check_sweep(tiny(space({"data.val_fraction": {"grid": [0.1, 0.2]}})), store)
    with pytest.raises(ConfigError, match="needs a validation split"):
        check_sweep(tiny("data.val_fraction=0", space({"train.lr": {"grid": [0.01]}})), store)
    check_sweep(tiny(space({"train.lr": {"grid": [0.01]}, "model.dropout": {"grid": [0.1]}})), store)


def test_trials_at_once_fits_the_cluster_or_says_what_is_missing():
    cfg = tiny("train.workers=1", "train.cpus_per_worker=1")
    assert trials_at_once(cfg, {"CPU": 2.0}) == 1  # the trial functions' 0.01 CPU each: a second group never fits
    assert trials_at_once(tiny("train.workers=1", "train.cpus_per_worker=0.99"), {"CPU": 2.0}) == 2
    assert trials_at_once(tiny("train.workers=2"), {"CPU": 8.0}) == 3
    assert trials_at_once(tiny("train.workers=1", "tune.max_concurrent_trials=1"), {"CPU": 8.0}) == 1
    assert trials_at_once(tiny("train.workers=1", "train.gpus_per_worker=1"), {"CPU": 16.0, "GPU": 3.0}) == 3
    with pytest.raises(ConfigError, match="one trial needs"):
        trials_at_once(tiny("train.workers=4"), {"CPU": 2.0})


def trials() -> list[TrialRecord]:
    return [
        TrialRecord("t0", {"train.lr": 0.1}, [{"step": 10, "val_bpb": 3.0}, {"step": 20, "val_bpb": 2.5}]),
        TrialRecord("t1", {"train.lr": 0.01}, [{"step": 10, "val_bpb": 2.8}, {"step": 20, "val_bpb": 2.2},
                                               {"step": 30, "val_bpb": 2.3}]),
        TrialRecord("t2", {"train.lr": 1e-5}, [{"step": 10, "val_bpb": 6.0}]),
        TrialRecord("t3", {"train.lr": 5.0}, [], error="RuntimeError: diverged"),
    ]


def test_results_table_is_best_first_with_how_each_trial_ended():
    table = results_table(trials(), "val_bpb", "min", max_steps=30)
    assert list(table["trial_id"]) == ["t1", "t0", "t2", "t3"]
    assert list(table["val_bpb"][:3]) == [2.2, 2.5, 6.0] and list(table["at_step"][:3]) == [20, 20, 10]
    assert list(table["ended"]) == ["finished", "stopped early", "stopped early", "error"]
    assert table.iloc[3]["error"] == "RuntimeError: diverged"
    assert list(results_table(trials(), "val_bpb", "max", 30)["trial_id"][:3]) == ["t2", "t0", "t1"]


def test_curves_png_draws_every_trial_with_a_metric():
    png = curves_png(trials(), "val_bpb", "sweep")
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_best_config_yaml_loads_as_a_training_preset_without_secrets(tmp_path):
    base = tiny(f"storage.root={tmp_path}", "name=sw", "storage.access_key_id=AKIA", "storage.secret_access_key=hush",
                space({"train.lr": {"grid": [0.01, 0.1]}}))
    cfg = best_config(base, {"train.lr": 0.1}, f"{tmp_path}/runs/sw/data")
    text = config_yaml(cfg, "The best trial.\nTrain it: lm train -c best.yaml")
    assert text.startswith("# The best trial.\n# Train it") and "hush" not in text and "AKIA" not in text
    path = tmp_path / "best.yaml"
    path.write_text(text)
    loaded = load_config(path)
    assert loaded.name == "sw-best" and loaded.train.lr == 0.1 and not loaded.tune.space
    assert loaded.data.output == f"{tmp_path}/runs/sw/data" and loaded.storage.access_key_id is None
    assert yaml.safe_load(text)["model"] == base.model.model_dump(mode="json")


def test_asha_lets_a_trial_finish_at_its_last_report():
    """Ray's ASHA keeps a rung at max_t (here 20 = 10 x 2) even with stop_last_trials=False: a trial that reaches
    step 20 below that rung's cutoff, as a trial resumed past step 10 reports there first, would be stopped (killed
    while it publishes its model directory); lm.tune.asha's lets it finish. No cluster needed."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler

    from lm.tune.asha import FinishingASHA

    for scheduler, at_the_end in ((ASHAScheduler, "STOP"), (FinishingASHA, "CONTINUE")):
        asha = scheduler(time_attr="step", metric="val_bpb", mode="min", max_t=20, grace_period=10,
                         reduction_factor=2, stop_last_trials=False)
        first, resumed, poor = (SimpleNamespace(trial_id=name) for name in ("first", "resumed", "poor"))
        for trial in (first, resumed, poor):
            asha.on_trial_add(None, trial)
        assert asha.on_trial_result(None, first, {"step": 10, "val_bpb": 4.0}) == "CONTINUE"
        assert asha.on_trial_result(None, first, {"step": 20, "val_bpb": 3.9}) == "CONTINUE"
        assert asha.on_trial_result(None, resumed, {"step": 20, "val_bpb": 4.1}) == at_the_end, scheduler
        assert asha.on_trial_result(None, poor, {"step": 10, "val_bpb": 4.7}) == "STOP"  # the rungs before still cut
