"""Bearer API keys: who may call the API, with which role and limits. Loaded where the app is built, from
an environment variable (comma-separated keys) and/or a YAML key file (:class:`KeyFile`, a mounted secret);
handed to the ingress only as SHA-256 digests (no key sits in Serve's deployment config); keys that are
placeholders or shorter than 16 characters are refused at load. Keys are never logged: errors name where a
key was found (the variable and its position, the file and the entry's name), never the key.

The key file (``serve.api_keys_file``), one format for the API and the console's roles::

    keys:
      - name: alice                 # names the key in errors and logs (never the key itself)
        key: sk-3f9c...             # 16 characters at least; not a placeholder
        role: user                  # user: the API and the console's playground; operator: also the
                                    #   console's operators' view and actions (lm.serve.console)
        requests_per_minute: 600    # optional limits (lm.config.serve.KeyLimits): 429 beyond them;
        tokens_per_minute: 200000   #   those left out come from serve.key_limits
        max_concurrent: 8
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from lm.config import ConfigError, ServeConfig
from lm.config.serve import KeyLimits

MIN_KEY_CHARS = 16
OPERATOR = "operator"  # the role of the console's operators' view and actions
Role = Literal["user", "operator"]
PLACEHOLDER = re.compile(r"replace|change.?me|placeholder|example|your.?key|demo.?key|x{6}|\.\.\.", re.I)


class ApiKey(KeyLimits):
    """One caller: its key, a name for errors and logs, its role and its limits (KeyLimits' fields; null:
    serve.key_limits)."""

    name: str = Field(min_length=1, pattern=r"^[\w.@$\[\]-]+$")
    key: SecretStr
    role: Role = "user"

    def limits(self, defaults: KeyLimits) -> KeyLimits:
        own = self.model_dump(include=set(KeyLimits.model_fields), exclude_none=True)
        return defaults.model_copy(update=own)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[ApiKey] = Field(min_length=1)


class Grant(BaseModel):
    """What a key may do in one ingress replica (the ingress's copy: no key, only its digest's entry)."""

    name: str
    role: Role
    limits: KeyLimits


def load_api_keys(serve: ServeConfig, environ: dict[str, str] | None = None) -> list[ApiKey]:
    """Keys from ``serve.api_keys_env`` and ``serve.api_keys_file``, each checked (ConfigError naming where a
    bad one is). With ``require_auth`` and no key anywhere: a ConfigError before anything starts."""
    environ = os.environ if environ is None else environ
    given = [k.strip() for k in environ.get(serve.api_keys_env, "").split(",") if k.strip()]
    keys = [ApiKey(name=f"${serve.api_keys_env}[{i}]", key=k) for i, k in enumerate(given)]
    for key in keys:
        _check_strength(key, key.name)
    if serve.api_keys_file:
        keys += _read_key_file(Path(serve.api_keys_file))
    if serve.require_auth and not keys:
        where = f"${serve.api_keys_env}" + (f" or {serve.api_keys_file}" if serve.api_keys_file else "")
        raise ConfigError(f"serve.require_auth is on but no API key is configured: set {where} "
                          "(or serve.require_auth=false for local use)")
    return keys


def _read_key_file(path: Path) -> list[ApiKey]:
    if not path.is_file():
        raise ConfigError(f"serve.api_keys_file: {path} does not exist")
    try:  # the messages name lines and fields, never a value (which may be a key)
        keys = KeyFile.model_validate(yaml.safe_load(path.read_text()) or {}).keys
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"serve.api_keys_file {path}: {line}not YAML "
                          f"({getattr(err, 'problem', 'unreadable')})") from None
    except ValidationError as err:
        where = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'file'}: {p['msg']}" for p in err.errors()[:3])
        raise ConfigError(f"serve.api_keys_file {path}: {where} (format: lm.serve.auth.KeyFile)") from None
    for key in keys:
        _check_strength(key, f"{key.name} in {path}")
    return keys


def _check_strength(key: ApiKey, where: str) -> None:
    secret = key.key.get_secret_value()
    if len(secret) < MIN_KEY_CHARS:
        raise ConfigError(f"API key {where} is shorter than {MIN_KEY_CHARS} characters; generate one with "
                          "`python -c 'import secrets; print(\"sk-\" + secrets.token_urlsafe(24))'`")
    if PLACEHOLDER.search(secret):
        raise ConfigError(f"API key {where} is a placeholder (as shipped in infra/secrets.yaml); set a random key")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def grants(keys: list[ApiKey], defaults: KeyLimits, replicas: int = 1) -> dict[str, Grant]:
    """Each key's digest → its grant, with limits divided among ``replicas`` ingress replicas (each enforces
    its share: limit / replicas, rounded up)."""
    def share(limits: KeyLimits) -> KeyLimits:
        return KeyLimits(**{f: None if v is None else math.ceil(v / replicas) for f, v in limits})

    return {digest(k.key.get_secret_value()): Grant(name=k.name, role=k.role, limits=share(k.limits(defaults)))
            for k in keys}


def identify(header: str | None, table: dict[str, Grant]) -> str | None:
    """The digest of the key an ``Authorization: Bearer <key>`` header carries, if it is in ``table``;
    "" when the table is empty (auth is off); None when the caller is not authorized."""
    if not table:
        return ""
    if not header or not header.startswith("Bearer "):
        return None
    given = digest(header.removeprefix("Bearer ").strip())
    return given if given in table else None


def grant_of(header: str | None, table: dict[str, Grant]) -> Grant | None:
    """The grant of the key an ``Authorization`` header carries; None when it has none (or auth is off)."""
    key = identify(header, table)
    return table.get(key) if key else None
