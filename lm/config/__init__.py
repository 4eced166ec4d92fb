"""The one typed configuration for lmforge's whole lifecycle.

A run is described by a YAML preset (``configs/*.yaml``) plus dotted ``key.sub=value`` overrides,
validated by the pydantic schema (``schema.py``) *before* any work starts. Unknown keys and wrong types raise
:class:`ConfigError` with the file (or override), the dotted key and what was expected.

    from lm.config import load_config
    cfg = load_config("configs/tiny.yaml", ["model.n_layers=4", "train.lr=1e-3"])

Sections: storage, data, tokenizer, model, train, generate, tune, eval, serve, continual, rag. Later
stages fill the sections they own; every field carries a description (``lm config show`` prints the resolved values).
"""

from lm.config.load import (
    check_tune_space,
    dump_yaml,
    load_config,
    parse_override,
    validate_config,
    with_overrides,
)
from lm.config.schema import (
    CleanConfig,
    Config,
    ConfigError,
    ContinualConfig,
    DataConfig,
    DedupConfig,
    EvalConfig,
    GenerateConfig,
    ModelConfig,
    Section,
    ServeConfig,
    SourceConfig,
    StorageConfig,
    TokenizerConfig,
    TrainConfig,
    join_uri,
)
from lm.config.tune import Dimension, TuneConfig

__all__ = [
    "CleanConfig",
    "Config",
    "ConfigError",
    "ContinualConfig",
    "DataConfig",
    "DedupConfig",
    "Dimension",
    "EvalConfig",
    "GenerateConfig",
    "ModelConfig",
    "Section",
    "ServeConfig",
    "SourceConfig",
    "StorageConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TuneConfig",
    "check_tune_space",
    "dump_yaml",
    "join_uri",
    "load_config",
    "parse_override",
    "validate_config",
    "with_overrides",
]


