"""Bearer API keys: loaded from an environment variable and/or a secret file where the app is built,
handed to the ingress only as SHA-256 digests (so no key sits in Serve's deployment config), and
checked in constant time. Keys are never logged; errors name where keys were looked for, never a key."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from lm.config import ConfigError, ServeConfig


def load_api_keys(serve: ServeConfig, environ: dict[str, str] | None = None) -> frozenset[str]:
    """Keys from ``serve.api_keys_env`` (comma-separated) and ``serve.api_keys_file`` (one per line).
    With ``require_auth`` and no key anywhere: a ConfigError before anything starts."""
    environ = os.environ if environ is None else environ
    keys = {k.strip() for k in environ.get(serve.api_keys_env, "").split(",") if k.strip()}
    if serve.api_keys_file:
        path = Path(serve.api_keys_file)
        if not path.is_file():
            raise ConfigError(f"serve.api_keys_file: {path} does not exist")
        keys |= {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if serve.require_auth and not keys:
        where = f"${serve.api_keys_env}" + (f" or {serve.api_keys_file}" if serve.api_keys_file else "")
        raise ConfigError(f"serve.require_auth is on but no API key is configured: set {where} "
                          "(or serve.require_auth=false for local use)")
    return frozenset(keys)


def key_digests(keys: frozenset[str]) -> frozenset[str]:
    return frozenset(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def authorized(header: str | None, digests: frozenset[str]) -> bool:
    """Whether an ``Authorization: Bearer <key>`` header carries a key whose digest is in ``digests``
    (always true when there are none: auth is off)."""
    if not digests:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    given = hashlib.sha256(header.removeprefix("Bearer ").strip().encode()).hexdigest().encode()
    return any(hmac.compare_digest(given, digest.encode()) for digest in digests)
