"""The model registry, kept in object storage (a folder or s3://): versions, their status, and the
``production`` / ``previous`` aliases that serving follows and continual learning moves.

    reg = Registry(store, cfg.registry_uri)                  # <storage.root>/registry unless continual.registry
    v = reg.register("s3://b/runs/x/model", parent="v000001", metrics={...}, config_hash=..., data_manifest=...)
    reg.promote(v.id, reason="gate passed")                  # production := v, previous := the old production
    reg.get("production").model_uri                          # what serving loads
    reg.rollback(reason="bad answers")                       # production := previous
    lm registry list | show [ID|ALIAS] | promote ID | reject ID | rollback | add --model URI

Layout: ``versions/vNNNNNN.json`` (one immutable record per version) and ``events/eNNNNNNNNN.json``, an
append-only log whose newest event holds the whole state (aliases, statuses, production history).
Every write creates one new object only if its name is free (``ObjectStore.create_if_absent``: a
conditional PUT on S3, a hard link in a folder), so concurrent writers never overwrite each other: a
writer that loses the race for the next event number re-reads the state and retries its change
(compare-and-swap on the log). A crash between any two writes leaves the last committed state, and
with it the last good production version, readable. Statuses: candidate (registered), production,
retired (was production), rejected (refused by the gate, or rolled back).
"""

from __future__ import annotations

import copy
import json
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lm.config import join_uri
from lm.storage import ObjectStore

ALIASES = ("production", "previous")
STATUSES = ("candidate", "production", "retired", "rejected")


class RegistryError(ValueError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, …)."""


@dataclass
class Version:
    id: str
    model_uri: str
    parent: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    data_manifest: str | None = None
    config_hash: str | None = None
    code_version: str | None = None
    gate_report: str | None = None  # the evaluation report that decided it (continual learning's gate)
    iteration: int | None = None  # the continual-learning iteration that made it (its ledger entry)
    created: float = 0.0
    note: str = ""
    status: str = "candidate"  # from the state, not stored in the version record
    reason: str = ""  # why it has its status (the last promote / reject / rollback)


def code_version() -> str:
    """lmforge's version, plus the git commit when running from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        out = version("lmforge")
    except PackageNotFoundError:
        out = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5, check=True).stdout.strip()
        out += f"+g{commit}" if commit else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def _empty_state() -> dict[str, Any]:
    return {"seq": 0, "aliases": {}, "status": {}, "reasons": {}, "history": []}


class Registry:
    """See the module docstring."""

    def __init__(self, store: ObjectStore, uri: str, *, max_retries: int = 200):
        self.store, self.uri, self.max_retries = store, uri.rstrip("/"), max_retries

    # ------------------------------------------------------------------------------------- reading

    def state(self) -> dict[str, Any]:
        """The newest committed state (an empty registry: seq 0, no aliases)."""
        events = self._names("events")
        if not events:
            return _empty_state()
        return json.loads(self.store.read_text(join_uri(self.uri, "events", events[-1])))

    def versions(self) -> list[Version]:
        state = self.state()
        return [self._with_state(self._record(name[:-5]), state) for name in self._names("versions")]

    def get(self, ref: str) -> Version:
        """A version by id (``v000003``) or alias (``production``, ``previous``)."""
        state = self.state()
        vid = state["aliases"].get(ref) if ref in ALIASES else ref
        if vid is None:
            raise RegistryError(f"the registry at {self.uri} has no {ref} version yet")
        return self._with_state(self._record(vid), state)


    def events(self) -> list[dict[str, Any]]:
        """Every committed event, oldest first."""
        return [json.loads(self.store.read_text(join_uri(self.uri, "events", n))) for n in self._names("events")]

    # ------------------------------------------------------------------------------------- writing

    def register(self, model_uri: str, *, parent: str | None = None, metrics: dict | None = None,
                 data_manifest: str | None = None, config_hash: str | None = None, note: str = "",
                 gate_report: str | None = None, iteration: int | None = None) -> Version:
        """Record a new candidate version (the next free id; racing writers each get their own)."""
        record = Version(id="", model_uri=model_uri, parent=parent, metrics=metrics or {}, data_manifest=data_manifest,
                         config_hash=config_hash, code_version=code_version(), gate_report=gate_report,
                         iteration=iteration, created=time.time(), note=note)
        taken = self._names("versions")
        n = int(taken[-1][1:7]) + 1 if taken else 1
        for _ in range(self.max_retries):
            record.id = f"v{n:06d}"
            body = {k: v for k, v in asdict(record).items() if k not in ("status", "reason")}
            if self.store.create_if_absent(join_uri(self.uri, "versions", f"{record.id}.json"),
                                           json.dumps(body, indent=2).encode()):
                self._commit("register", record.id, "", lambda s: s)
                return record
            n += 1
        raise RegistryError(f"could not claim a version id in {self.uri} after {self.max_retries} tries")

    def promote(self, vid: str, reason: str = "") -> dict[str, Any]:
        """``vid`` becomes production; the old production becomes previous (status retired)."""
        self._record(vid)  # exists

        def change(state: dict) -> dict:
            status = state["status"].get(vid, "candidate")
            if status == "production":
                raise RegistryError(f"{vid} is already production")
            if status == "rejected":
                raise RegistryError(f"{vid} was rejected ({state['reasons'].get(vid, '')}); promote another version")
            old = state["aliases"].get("production")
            if old:
                state["status"][old] = "retired"
                state["aliases"]["previous"] = old
            state["aliases"]["production"] = vid
            state["status"][vid] = "production"
            state["history"].append(vid)
            return state

        return self._commit("promote", vid, reason, change)

    def reject(self, vid: str, reason: str) -> dict[str, Any]:
        """Mark a candidate rejected (the gate said no), with why."""
        self._record(vid)

        def change(state: dict) -> dict:
            if state["status"].get(vid) == "production":
                raise RegistryError(f"{vid} is production; roll back instead of rejecting it")
            state["status"][vid] = "rejected"
            return state

        return self._commit("reject", vid, reason, change)

    def rollback(self, reason: str = "") -> dict[str, Any]:
        """Production goes back to the previous production version; the rolled-back one is rejected."""

        def change(state: dict) -> dict:
            history = state["history"]
            if len(history) < 2:
                raise RegistryError(f"the registry at {self.uri} has no previous production version to roll back to")
            bad, good = history.pop(), history[-1]
            state["status"][bad], state["status"][good] = "rejected", "production"
            state["reasons"][bad] = "rolled back" + (f": {reason}" if reason else "")
            state["version"] = bad
            state["aliases"] = {"production": good, **({"previous": history[-2]} if len(history) > 1 else {})}
            return state

        return self._commit("rollback", None, reason, change)

    # ------------------------------------------------------------------------------------- plumbing

    def _commit(self, action: str, vid: str | None, reason: str, change: Callable[[dict], dict]) -> dict[str, Any]:
        """Append one event: read the newest state, apply ``change``, create the next event if its number
        is still free, else re-read and retry (compare-and-swap)."""
        for attempt in range(self.max_retries):
            current = self.state()
            state = change({**copy.deepcopy(current), "version": None})
            if vid is not None and reason:
                state["reasons"][vid] = reason
            state.update(seq=current["seq"] + 1, action=action, version=vid or state.get("version"), reason=reason,
                         at=time.time())
            name = f"e{state['seq']:09d}.json"
            if self.store.create_if_absent(join_uri(self.uri, "events", name), json.dumps(state, indent=2).encode()):
                return state
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 20)))  # another writer won this number
        raise RegistryError(f"could not commit {action} to {self.uri} after {self.max_retries} tries")

    def _names(self, folder: str) -> list[str]:
        prefix = join_uri(self.uri, folder) + "/"
        return sorted(u[len(prefix):] for u in self.store.list(prefix) if u.endswith(".json"))

    def _record(self, vid: str) -> Version:
        from lm.storage import StorageNotFound

        try:
            body = json.loads(self.store.read_text(join_uri(self.uri, "versions", f"{vid}.json")))
        except StorageNotFound:
            raise RegistryError(f"no version {vid!r} in the registry at {self.uri}") from None
        return Version(**body)

    @staticmethod
    def _with_state(v: Version, state: dict) -> Version:
        v.status = state["status"].get(v.id, "candidate")
        v.reason = state["reasons"].get(v.id, "")
        return v


def table(versions: list[Version], state: dict) -> str:
    """``lm registry list``: one line per version, aliases marked."""
    by_id = {vid: alias for alias, vid in state.get("aliases", {}).items()}
    lines = [f"{'version':<9} {'status':<10} {'alias':<10} {'parent':<9} {'created':<19} model"]
    for v in versions:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v.created))
        lines.append(f"{v.id:<9} {v.status:<10} {by_id.get(v.id, ''):<10} {v.parent or '-':<9} {created:<19} "
                     f"{v.model_uri}" + (f"  ({v.reason})" if v.reason else ""))
    return "\n".join(lines)
