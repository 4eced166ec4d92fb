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


def test_with_absolute_paths_resolves_every_marked_path(tmp_path, monkeypatch):
    """Every path field (lm.config.base.PATH), in lists of sources too; URIs with a scheme stay."""
    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({
        "data": {"sources": [{"name": "local", "uri": "corpus/*.txt"},
                             {"name": "s", "uri": "bundled://tinyshakespeare"}]},
        "continual": {"corpus": [{"name": "new", "uri": "incoming/"}]},
        "rag": {"sources": [{"name": "plays", "uri": "s3://bucket/plays/"}]},
        "serve": {"model": "registry:production", "api_keys_file": "keys.yaml", "feedback": {"uri": "fb"}},
        "eval": {"sets": [{"name": "val", "uri": "held.txt"}], "labelled_set": "labels.jsonl"},
    })
    out = cfg.with_absolute_paths()
    here = str(tmp_path.resolve())
    assert [s.uri for s in out.data.sources] == [f"{here}/corpus/*.txt", "bundled://tinyshakespeare"]
    assert out.continual.corpus[0].uri == f"{here}/incoming/"  # a folder prefix stays one
    assert out.rag.sources[0].uri == "s3://bucket/plays/"
    assert out.serve.model == "registry:production"
    assert (out.serve.api_keys_file, out.serve.feedback.uri) == (f"{here}/keys.yaml", f"{here}/fb")
    assert (out.eval.sets[0].uri, out.eval.labelled_set, out.eval.generation_set) == (
        f"{here}/held.txt", f"{here}/labels.jsonl", "builtin")  # builtin: a name, not a path
    assert out.storage.root == f"{here}/lmforge-store" and out.train.init_from is None
    assert cfg.data.sources[0].uri == "corpus/*.txt"  # a copy: the original is left as it is
    assert load_config(None, ["serve.model=s3://b/m"]).with_absolute_paths().serve.model == "s3://b/m"


def test_data_fingerprint_is_the_same_for_relative_and_absolute_sources(tmp_path, monkeypatch):
    """`lm prepare` reads the sources as written, `lm train` after with_absolute_paths: the same inputs."""
    from lm.data.pipeline import inputs_fingerprint

    monkeypatch.chdir(tmp_path)
    cfg = Config.model_validate({"data": {"sources": [{"name": "local", "uri": "corpus/"}]}})
    files = [{"uri": "corpus/a.txt", "size": 3}]
    absolute = [{"uri": str(tmp_path.resolve() / "corpus/a.txt"), "size": 3}]
    assert inputs_fingerprint(cfg, files) == inputs_fingerprint(cfg.with_absolute_paths(), absolute)
