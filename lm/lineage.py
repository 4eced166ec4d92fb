"""Provenance: the chain from a response, a registry version or a model directory back to the data.

    lm lineage <response id | registry version or alias | model directory> [--json] [--verify]

    chain = build_chain(cfg, store, "chatcmpl-3f…")        # a typed Chain (lm.lineage_render prints it)
    verify_chain(store, chain)                              # chain.checks: each hash recomputed

The links, each read from what the stages already write:

1. response id → model version: Serve's response records (``<storage.root>/responses``, lm.serve.feedback),
   metadata only, written for every response;
2. version → registry record (lm.registry): parent version, gate report, continual iteration;
3. → the model directory's ``lineage.json`` (lm.train.publish): the training run's config hash (the resolved
   config is ``<run>/train/config.json``), code commit (lm.provenance), seed, steps, tokens, losses;
4. → its data manifest (lm.data.manifest) → the shards with their SHA-256;
5. → the source objects per source (lm.data.objects): S3 keys with ETags, local files with size, mtime, SHA-256;
6. continual versions: the ledger's inputs of their iteration (feedback logs and new documents with their
   ETags, lm.continual.ledger), the new documents' and the replayed data's manifests, and the parent
   version's own chain.

``--verify`` recomputes every hash on the way (model files against ``_PUBLISHED.json``, the config hash,
each shard, each local source file; S3 ETags and ledger inputs are listed again) and fails on any difference.
"""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import BaseModel, ConfigDict

from lm.config import Config, join_uri
from lm.data.manifest import MixManifest, read_manifest, shard_uri
from lm.data.objects import SourceObject, check_object
from lm.registry import ALIASES, Registry, Version
from lm.storage import ObjectStore, StorageError, StorageNotFound

_VERSION = re.compile(r"^v\d{6}$")
_MAX_DEPTH = 20  # parent versions followed at most (a registry cannot loop, but a bad record could)


class LineageError(StorageError):
    """A reference that leads nowhere (no such response, version or model directory)."""


class Link(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Check(Link):
    """One hash recomputed (``--verify``)."""

    what: str
    ok: bool
    detail: str = ""


class ResponseLink(Link):
    id: str
    type: str = ""
    model_version: str
    model_uri: str | None = None
    time: float
    log: str  # the response log object it is in


class VersionLink(Link):
    id: str
    status: str
    model_uri: str
    parent: str | None = None
    gate_report: str | None = None
    iteration: int | None = None
    config_hash: str | None = None
    code_version: str | None = None
    note: str = ""
    created: float = 0.0


class RunLink(Link):
    """The training run, from the model directory's ``lineage.json`` (a directory made otherwise, say by hand,
    may say little more than its run's name)."""

    model_uri: str
    run: str = ""
    trainer: str = ""
    config_hash: str | None = None
    config: str | None = None  # <run>/train/config.json
    code_commit: str | None = None
    seed: int | None = None
    steps: int | None = None
    tokens: int = 0
    final_loss: float | None = None
    val_loss: float | None = None
    data_manifest: str | None = None


class ShardLink(Link):
    uri: str
    split: str
    rows: int
    sha256: str | None = None


class DataLink(Link):
    """A data directory's manifest: its shards, its source objects, and (a continual mix) its parts."""

    uri: str  # the manifest's URI
    kind: str
    inputs_fingerprint: str
    shards: list[ShardLink]
    sources: dict[str, list[SourceObject]] = {}
    parts: dict[str, DataLink] = {}  # continual mix: "new" (new documents), "replay" (the parent's data)


class ContinualLink(Link):
    iteration: int
    inputs: dict[str, str]  # the ledger's claim: URI -> ETag (feedback logs, new documents)
    parent: Chain | None = None


class Chain(Link):
    ref: str
    response: ResponseLink | None = None
    version: VersionLink | None = None
    run: RunLink | None = None
    data: DataLink | None = None
    continual: ContinualLink | None = None
    checks: list[Check] = []


# ------------------------------------------------------------------------------------------ building


def build_chain(cfg: Config, store: ObjectStore, ref: str) -> Chain:
    """The chain of ``ref``: a response id, a registry version id or alias, or a model directory URI."""
    registry = Registry(store, cfg.registry_uri)
    if ref in ALIASES or _VERSION.match(ref):
        return _version_chain(cfg, store, registry, registry.get(ref), ref, 0)
    if store.exists(join_uri(ref, "lineage.json")):
        version = next((v for v in _versions(registry) if v.model_uri.rstrip("/") == ref.rstrip("/")), None)
        if version is not None:
            return _version_chain(cfg, store, registry, version, ref, 0)
        run, data = _model_links(store, ref)
        return Chain(ref=ref, run=run, data=data)
    response = find_response(store, cfg.responses_uri, ref)
    if _VERSION.match(response.model_version):
        chain = _version_chain(cfg, store, registry, registry.get(response.model_version), ref, 0)
    elif response.model_uri:
        chain = build_chain(cfg, store, response.model_uri)
    else:
        raise LineageError(f"response {ref}: its record names no model directory")
    return chain.model_copy(update={"ref": ref, "response": response})


def _versions(registry: Registry) -> list[Version]:
    try:
        return registry.versions()
    except StorageError:
        return []


def find_response(store: ObjectStore, prefix: str, rid: str) -> ResponseLink:
    """The record of response ``rid`` in Serve's response logs (newest log objects first)."""
    for uri in sorted(store.list(prefix.rstrip("/") + "/"), reverse=True):
        if not uri.endswith(".jsonl"):
            continue
        text = store.read_text(uri)
        if f'"{rid}"' not in text:
            continue
        for line in text.splitlines():
            record = json.loads(line)
            if record.get("id") == rid:
                return ResponseLink(**record, log=uri)
    raise LineageError(f"{rid!r}: not a registry version, a model directory, or a response id recorded under {prefix}")


def _version_chain(cfg: Config, store: ObjectStore, registry: Registry, v: Version, ref: str, depth: int) -> Chain:
    link = VersionLink(**{k: getattr(v, k) for k in VersionLink.model_fields})
    run, data = _model_links(store, v.model_uri)
    chain = Chain(ref=ref, version=link, run=run, data=data)
    if v.iteration is not None:
        chain.continual = _continual(cfg, store, registry, v, depth)
    return chain


def _continual(cfg: Config, store: ObjectStore, registry: Registry, v: Version, depth: int) -> ContinualLink:
    from lm.continual.ledger import Ledger, continual_root

    ledger = Ledger(store, continual_root(cfg.registry_uri))
    claim = next((it for it in ledger.iterations() if it["n"] == v.iteration), None)
    parent = None
    if v.parent and depth < _MAX_DEPTH:
        parent = _version_chain(cfg, store, registry, registry.get(v.parent), v.parent, depth + 1)
    return ContinualLink(iteration=v.iteration, inputs=claim["inputs"] if claim else {}, parent=parent)


def _model_links(store: ObjectStore, model_uri: str) -> tuple[RunLink, DataLink | None]:
    """The run and data links of a model directory (no data link: its lineage names no data manifest)."""
    try:
        lineage = json.loads(store.read_text(join_uri(model_uri, "lineage.json")))
    except StorageNotFound:
        raise LineageError(f"{model_uri}: no lineage.json (not a model directory lmforge trained)") from None
    run = RunLink(model_uri=model_uri, **lineage)
    return run, data_link(store, run.data_manifest.rsplit("/", 1)[0]) if run.data_manifest else None


def data_link(store: ObjectStore, data_uri: str, depth: int = 0) -> DataLink:
    """The manifest of ``data_uri`` as a link (a continual mix: with its new and replayed data's links)."""
    manifest = read_manifest(store, data_uri)
    shards = [ShardLink(uri=shard_uri(data_uri, s.path), split=s.split, rows=s.rows, sha256=s.sha256)
              for s in manifest.shards]
    link = DataLink(uri=join_uri(data_uri, "manifest.json"), kind=manifest.kind,
                    inputs_fingerprint=manifest.inputs_fingerprint, shards=shards)
    if isinstance(manifest, MixManifest):
        for part, uri in (("new", manifest.new_data), ("replay", manifest.replay_from)):
            if uri and depth < 2 and store.exists(join_uri(uri, "manifest.json")):
                link.parts[part] = data_link(store, uri, depth + 1)
    else:
        link.sources = {name: src.objects for name, src in manifest.sources.items()}
    return link


# ------------------------------------------------------------------------------------------ verifying


def _sha256(store: ObjectStore, uri: str) -> str:
    digest = hashlib.sha256()
    with store.open(uri) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check(what: str, expected: str | None, got: str) -> Check:
    ok = expected is not None and got.startswith(expected) if expected else False
    detail = "" if ok else f"recorded {expected or 'nothing'}, now {got[:16]}…"
    return Check(what=what, ok=ok, detail=detail)


def _verify_model(store: ObjectStore, run: RunLink) -> list[Check]:
    """Each file of the model directory against its ``_PUBLISHED.json`` listing; the config hash."""
    try:
        listing = store.read_published_listing(run.model_uri)["files"]
    except StorageError as err:
        return [Check(what=f"model {run.model_uri}", ok=False, detail=str(err))]
    checks = [_check(f"model file {f['path']}", f["sha256"], _sha256(store, join_uri(run.model_uri, f["path"])))
              for f in listing]
    if run.config:
        blob = store.read_bytes(run.config)
        checks.append(_check(f"config hash ({run.config})", run.config_hash, hashlib.sha256(blob).hexdigest()))
    return checks


def _verify_data(store: ObjectStore, data: DataLink) -> list[Check]:
    checks = [_check(f"shard {s.uri}", s.sha256, _sha256(store, s.uri)) for s in data.shards]
    listings: dict[str, dict[str, str]] = {}
    for name, objects in data.sources.items():
        for obj in objects:
            changed = check_object(store, obj, listings)
            checks.append(Check(what=f"source {name}: {obj.uri}", ok=not changed, detail=changed))
    for part in data.parts.values():
        checks += _verify_data(store, part)
    return checks


def _verify_inputs(store: ObjectStore, inputs: dict[str, str]) -> list[Check]:
    listings: dict[str, dict[str, str]] = {}
    checks = []
    for uri, tag in sorted(inputs.items()):
        if tag == "bundled":
            continue
        prefix = uri.rsplit("/", 1)[0] + "/"
        if prefix not in listings:
            listings[prefix] = store.list_etags(prefix)
        now = listings[prefix].get(uri)
        detail = "" if now == tag else f"ETag {tag} is now {now}"
        checks.append(Check(what=f"ledger input {uri}", ok=now == tag, detail=detail))
    return checks


def verify_chain(store: ObjectStore, chain: Chain) -> Chain:
    """``chain`` with every hash on the way recomputed into ``checks`` (its parents' too)."""
    checks: list[Check] = []
    if chain.run is not None:
        checks += _verify_model(store, chain.run)
    if chain.data is not None:
        checks += _verify_data(store, chain.data)
    if chain.continual is not None:
        checks += _verify_inputs(store, chain.continual.inputs)
        if chain.continual.parent is not None:
            chain.continual.parent = verify_chain(store, chain.continual.parent)
    chain.checks = checks
    return chain


def all_checks(chain: Chain) -> list[Check]:
    """The checks of ``chain`` and of its parents'."""
    parent = chain.continual.parent if chain.continual else None
    return chain.checks + (all_checks(parent) if parent else [])


ContinualLink.model_rebuild()
