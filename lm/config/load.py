"""Loading a config: YAML preset + dotted ``key.sub=value`` overrides, validated with errors that
name the file or override, the dotted key and what was expected.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from lm.config.schema import Config, ConfigError


def _field_type(path: list[str]) -> Any:
    """The annotation of the config field at a dotted path (None if the path is not in the schema)."""
    node: Any = Config
    for part in path:
        origin = typing.get_origin(node)
        if origin is list and part.isdigit():
            node = typing.get_args(node)[0]
            continue
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return None
        node = node.model_fields[part].annotation
    return node


def _wants_string(annotation: Any) -> bool:
    """True for ``str`` / ``SecretStr`` fields, optional or not."""
    if annotation in (str, SecretStr):
        return True
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return is_union and any(arg in (str, SecretStr) for arg in typing.get_args(annotation))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"model.n_layers=4"`` → (["model", "n_layers"], 4).

    The value is parsed as YAML (numbers, booleans, null, [lists], {maps}), except that a field
    declared as a string takes the text exactly as typed (``generate.prompt=ROMEO: `` stays a string).
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    path = key.strip().split(".")
    if _wants_string(_field_type(path)):
        return path, None if raw in ("null", "~") else raw
    try:
        return path, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None


def _set_path(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node: Any = tree
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin}: {'.'.join(path[: i + 1])}: no list item {part!r} (list has {len(node)})")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{origin}: {'.'.join(path[:i])} is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _describe(err: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key"
    got = err.get("input")
    if isinstance(got, dict | list):
        return msg
    return f"{msg}, got {got!r}"


def validate_config(tree: dict[str, Any], origins: dict[str, str] | None = None) -> Config:
    """Validate a raw config tree; errors name the dotted key and where it was set."""
    origins = origins or {}
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            key = ".".join(str(p) for p in item["loc"]) or "<root>"
            related = [
                origins[k]
                for k in sorted(origins, key=len, reverse=True)
                if key == k or key.startswith(k + ".") or k.startswith(key + ".")
            ]
            origin = ", ".join(dict.fromkeys(related)) or "defaults"
            lines.append(f"{origin}: {key}: {_describe(item)}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def with_overrides(cfg: Config, values: dict[str, Any], origin: str = "override") -> Config:
    """``cfg`` with dotted keys set to new values, validated again (a Tune trial's config)."""
    tree = cfg.model_dump(mode="python")
    tree["tune"]["space"] = {}  # a trial does not search again
    origins = {}
    for dotted, value in values.items():
        keys = dotted.split(".")
        _set_path(tree, keys, value, f"{origin} {dotted}={value!r}")
        origins[dotted] = f"{origin} {dotted}={value!r}"
    return validate_config(tree, origins)


def config_value(cfg: Config, dotted: str) -> Any:
    """The value at a dotted key (sections as plain data)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else getattr(node, part)
    return node.model_dump(mode="python") if isinstance(node, BaseModel) else node


def check_tune_space(cfg: Config) -> Config:
    """Every value a search can give must make a valid config (checked before any trial starts); returns
    ``cfg`` with listed values typed as the schema types them (YAML reads ``2e-5`` as a string)."""
    space = {}
    for dotted, dimension in cfg.tune.space.items():
        typed = [config_value(with_overrides(cfg, {dotted: value}, f"tune.space.{dotted}.{dimension.kind}:"), dotted)
                 for value in dimension.candidates()]
        space[dotted] = dimension.model_copy(update={dimension.kind: typed}) if dimension.kind in ("grid", "choice") \
            else dimension
    return cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"space": space})})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults), apply dotted overrides, validate."""
    tree: dict[str, Any] = Config().model_dump(mode="python")
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        tree = _merge(tree, loaded)
        origins[""] = str(path)
        for key in _leaf_keys(loaded):
            origins[key] = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(tree, keys, value, f"override {text!r}")
        origins[".".join(keys)] = f"override {text!r}"
    cfg = validate_config(tree, {k: v for k, v in origins.items() if k})
    return check_tune_space(cfg)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``update`` into ``base``: mappings merge, everything else (lists too) replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, sub in tree.items() for k in _leaf_keys(sub, f"{prefix}{key}.")] or [prefix[:-1]]
    if isinstance(tree, list):
        return [k for i, sub in enumerate(tree) for k in _leaf_keys(sub, f"{prefix}{i}.")] or [prefix[:-1]]
    return [prefix[:-1]]


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML (secrets masked)."""
    return yaml.safe_dump(cfg.public_dict(), sort_keys=False, allow_unicode=True)
