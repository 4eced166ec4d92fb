"""lm.registry: versions, statuses, production / previous, rollback, and concurrent writers on a folder
and on the real S3 server (conditional PUTs), plus what a crash leaves behind."""

from __future__ import annotations

import json
import multiprocessing
import threading

import pytest

from lm.config import StorageConfig, join_uri
from lm.registry import Registry, RegistryError
from lm.storage import ObjectStore


def registry(root) -> Registry:
    return Registry(root.store, join_uri(root.uri, "registry"))


def test_versions_promote_reject_rollback(store_root):
    reg = registry(store_root)
    assert reg.state()["seq"] == 0 and reg.versions() == []
    with pytest.raises(RegistryError, match="no production version"):
        reg.get("production")
    v1 = reg.register("s3://b/m1", metrics={"val_bpb": 2.5}, config_hash="abc")
    v2 = reg.register("s3://b/m2", parent=v1.id)
    v3 = reg.register("s3://b/m3", parent=v2.id)
    assert [v.id for v in reg.versions()] == ["v000001", "v000002", "v000003"]
    assert all(v.status == "candidate" for v in reg.versions()) and v1.code_version

    reg.promote(v1.id, reason="first")
    reg.promote(v2.id, reason="gate passed")
    assert reg.get("production").id == v2.id and reg.get("previous").id == v1.id
    assert reg.get(v1.id).status == "retired" and reg.get("production").model_uri == "s3://b/m2"
    assert reg.get(v2.id).parent == v1.id and reg.get(v1.id).metrics == {"val_bpb": 2.5}

    reg.reject(v3.id, reason="val_bpb regressed by 0.3")
    assert reg.get(v3.id).status == "rejected" and "regressed" in reg.get(v3.id).reason
    with pytest.raises(RegistryError, match="was rejected"):
        reg.promote(v3.id)
    with pytest.raises(RegistryError, match="already production"):
        reg.promote(v2.id)
    with pytest.raises(RegistryError, match="roll back instead"):
        reg.reject(v2.id, reason="x")
    with pytest.raises(RegistryError, match="no version 'v000042'"):
        reg.promote("v000042")

    state = reg.rollback(reason="bad answers")
    assert state["aliases"] == {"production": v1.id}
    assert reg.get("production").id == v1.id and reg.get(v2.id).status == "rejected"
    assert reg.get(v2.id).reason == "rolled back: bad answers"
    with pytest.raises(RegistryError, match="no previous production"):
        reg.rollback()
    assert [e["action"] for e in reg.events()] == ["register"] * 3 + ["promote", "promote", "reject", "rollback"]
    assert [e["seq"] for e in reg.events()] == list(range(1, 8))


def _race(reg: Registry, n: int, tag: str) -> None:
    for i in range(n):
        v = reg.register(f"/models/{tag}-{i}")
        reg.promote(v.id, reason=tag)


def check_race(reg: Registry, writers: int, each: int) -> None:
    """Every writer's every change is in the log exactly once, in one gap-free sequence."""
    events = reg.events()
    assert [e["seq"] for e in events] == list(range(1, 2 * writers * each + 1))
    versions = reg.versions()
    assert len(versions) == writers * each and len({v.model_uri for v in versions}) == writers * each
    promoted = [e["version"] for e in events if e["action"] == "promote"]
    assert sorted(promoted) == sorted(v.id for v in versions)  # no promotion lost
    state = reg.state()
    assert state["history"] == promoted and state["aliases"]["production"] == promoted[-1]
    assert state["aliases"]["previous"] == promoted[-2]
    assert [v.id for v in versions if v.status == "production"] == [promoted[-1]]


def test_racing_writers_threads(store_root):
    """Threads share nothing but the store: conditional creates on S3, hard links in a folder."""
    reg = registry(store_root)
    writers, each = 6, 3
    threads = [threading.Thread(target=_race, args=(Registry(reg.store, reg.uri), each, f"w{w}"))
               for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    check_race(reg, writers, each)


def _process_writer(root: str, uri: str, each: int, tag: str) -> None:
    _race(Registry(ObjectStore(StorageConfig(root=root)), uri), each, tag)


def test_racing_writer_processes_on_a_folder(tmp_path):
    uri = str(tmp_path / "registry")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_process_writer, args=(str(tmp_path), uri, 4, f"p{w}")) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    check_race(Registry(ObjectStore(StorageConfig(root=str(tmp_path))), uri), 3, 4)


def test_a_crash_leaves_the_last_committed_state(store_root):
    """A version written without its event (a crash in between), an event number taken by a dead
    writer's temp file: the registry still reads the last good state and goes on."""
    reg = registry(store_root)
    v1 = reg.register("/m1")
    reg.promote(v1.id)
    store = store_root.store
    orphan = {"id": "v000002", "model_uri": "/m2", "created": 0.0}
    assert store.create_if_absent(join_uri(reg.uri, "versions", "v000002.json"), json.dumps(orphan).encode())
    if store_root.kind == "local":  # a writer killed between writing its temp file and linking it
        (store.local_path(join_uri(reg.uri, "events")) / ".lmtmp-e000000003.json-dead").write_text("{")
    assert reg.get("production").id == v1.id and reg.state()["seq"] == 2
    assert reg.get("v000002").status == "candidate"
    v3 = reg.register("/m3")
    assert v3.id == "v000003"
    reg.promote(v3.id)
    assert reg.get("production").id == v3.id and reg.state()["seq"] == 4


def test_create_if_absent_is_first_writer_wins(store_root):
    uri = join_uri(store_root.uri, "claims", "one.json")
    assert store_root.store.create_if_absent(uri, b"first")
    assert not store_root.store.create_if_absent(uri, b"second")
    assert store_root.store.read_bytes(uri) == b"first"
