"""The config schema: presets load, overrides apply, bad input fails naming file, key and problem."""

from pathlib import Path

import pytest

from lm.config import Config, ConfigError, dump_yaml, load_config, parse_override

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def test_configs_folder_is_not_empty():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "shakespeare-cpu"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert load_config(None, []).model_dump() != cfg.model_dump() or path.stem == "default"


def test_overrides_apply_with_types():
    cfg = load_config("configs/tiny.yaml", ["model.n_layers=3", "train.lr=1e-3", "train.max_seconds=null",
                                            "data.sources.0.uri=s3://bucket/corpus", "name=x1"])
    assert cfg.model.n_layers == 3 and cfg.train.lr == 1e-3 and cfg.train.max_seconds is None
    assert cfg.data.sources[0].uri == "s3://bucket/corpus"
    assert cfg.run_uri == "./lmforge-store/runs/x1"
    # untouched preset values survive
    assert cfg.model.d_model == 64


def test_override_strings_stay_verbatim():
    assert parse_override("generate.prompt=ROMEO: ")[1] == "ROMEO: "
    assert parse_override("generate.prompt=  007")[1] == "  007"
    assert parse_override("train.lr=0.5")[1] == 0.5
    assert parse_override("data.sources.0.delimiter=null")[1] is None
    assert load_config(None, ["generate.stop=[\"\\n\\n\", END]"]).generate.stop == ["\n\n", "END"]


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  n_layer: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "model.n_layer" in str(err.value) and "unknown key" in str(err.value)


def test_wrong_type_names_override_key_and_expectation():
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["train.batch_size=lots"])
    msg = str(err.value)
    assert "override 'train.batch_size=lots'" in msg and "train.batch_size" in msg and "integer" in msg
    assert "'lots'" in msg


def test_cross_field_rule_names_section():
    with pytest.raises(ConfigError, match=r"model: .*divisible by n_kv_heads"):
        load_config(None, ["model.n_heads=4", "model.n_kv_heads=3"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        load_config(None, ["no-equals-sign"])
    with pytest.raises(ConfigError, match="no list item"):
        load_config(None, ["data.sources.5.uri=x"])


def test_secrets_are_masked_everywhere():
    cfg = load_config(None, ["storage.secret_access_key=hunter2-secret", "storage.access_key_id=AKIAXYZ"])
    assert cfg.storage.secret_access_key.get_secret_value() == "hunter2-secret"
    for text in (dump_yaml(cfg), repr(cfg), str(cfg.public_dict())):
        assert "hunter2-secret" not in text and "AKIAXYZ" not in text


def test_fingerprint_tracks_content():
    a, b = load_config("configs/tiny.yaml"), load_config("configs/tiny.yaml")
    assert a.fingerprint() == b.fingerprint()
    assert load_config("configs/tiny.yaml", ["train.lr=0.1"]).fingerprint() != a.fingerprint()


def test_every_field_is_documented():
    def walk(model_cls, prefix=""):
        for name, field in model_cls.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, Config.__mro__[1]):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field.description

    missing = [key for key, desc in walk(Config) if not desc and key != "data.sources"]
    assert not missing, f"undocumented config fields: {missing}"
