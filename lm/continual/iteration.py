"""One continual-learning iteration, and the loop that repeats it: serve → learn → gate → redeploy.

    lm continual -c configs/tiny.yaml [--watch]          (or jobs/continual.py on a cluster)

1. Inputs: objects under ``continual.corpus`` and Serve's feedback logs that the ledger has not seen
   (key + ETag, lm.continual.ledger). An iteration that was interrupted is resumed instead: same
   claim, same folder, same parent version.
2. Data: lm.continual.increment.build_mix (production tokenizer, dedup against the corpus, feedback
   as supervised examples, replay of the original data).
3. Fine-tune the production model on Ray Train + DeepSpeed (lm.train.trainer with ``train.init_from``),
   in ``<registry>/continual/runs/iNNNNNN/``; a re-run resumes from the last checkpoint there.
4. Gate: lm.eval evaluates candidate and production on the sets ``fixed`` (the original validation
   split) and ``new`` (the new data's held-out part) against ``continual.gate``.
5. The candidate is registered, then promoted (Serve replicas following ``registry:production`` swap
   to it, hot-reload style, with no downtime) or rejected with the failed rules; the ledger records
   the outcome, so its inputs are never learned from again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection

from lm.config import Config, join_uri
from lm.config.eval import EvalSetConfig
from lm.continual.increment import Mix, build_mix, list_inputs
from lm.continual.ledger import Ledger, continual_root
from lm.progress import Log
from lm.registry import Registry, RegistryError, Version
from lm.storage import ObjectStore


def continual_uri(cfg: Config) -> str:
    """Where the ledger and the iterations' folders live: ``<registry>/continual``."""
    return continual_root(cfg.registry_uri)


def iteration_uri(cfg: Config, n: int) -> str:
    return join_uri(continual_uri(cfg), "runs", f"i{n:06d}")


def fine_tune_config(cfg: Config, n: int, mix_uri: str, init_from: str) -> Config:
    """The training config of iteration ``n``: ``cfg.train`` with continual's steps and learning rate (Muon's,
    optimizer muon, scaled as train.lr is), starting from ``init_from``, reading the mix, writing into the
    iteration's folder."""
    c, scale = cfg.continual, cfg.continual.lr / cfg.train.lr  # Muon's matrices step down by the same ratio
    train = cfg.train.model_copy(update={
        "init_from": init_from, "max_steps": c.steps, "lr": c.lr, "min_lr": min(cfg.train.min_lr, c.lr),
        "muon_lr": cfg.train.muon_lr * scale,
        "warmup_steps": min(c.warmup_steps, c.steps), "eval_interval": min(cfg.train.eval_interval, c.steps),
        "max_seconds": None, "schedule_unit": "steps", "stop_after_steps": None, "early_stopping_patience": None})
    data = cfg.data.model_copy(update={"output": mix_uri})
    return cfg.model_copy(update={"name": f"{cfg.name}-i{n:06d}", "output": iteration_uri(cfg, n), "train": train,
                                  "data": data})


def gate_config(cfg: Config, n: int, gate_texts: str) -> Config:
    """The evaluation config of the gate: sets ``fixed`` (the original data's validation split) and
    ``new`` (the held-out texts of this iteration's data), rules ``continual.gate``."""
    sets = [EvalSetConfig(name="fixed", split="val"), EvalSetConfig(name="new", uri=gate_texts, format="jsonl")]
    ev = cfg.eval.model_copy(update={"sets": sets, "compare": cfg.continual.gate,
                                     "output": join_uri(iteration_uri(cfg, n), "eval")})
    data = cfg.data.model_copy(update={"output": cfg.data_uri})  # the original data, not <iteration>/data
    return cfg.model_copy(update={"output": iteration_uri(cfg, n), "eval": ev, "data": data})


def _parent(store: ObjectStore, registry: Registry, it_uri: str) -> Version:
    """The production version this iteration fine-tunes, fixed at its first run (a resumed run keeps it)."""
    uri = join_uri(it_uri, "parent.json")
    store.create_if_absent(uri, json.dumps({"version": registry.get("production").id}).encode())
    return registry.get(json.loads(store.read_text(uri))["version"])


def _fine_tune(ft: Config, store: ObjectStore, mix: Mix, log: Log) -> str:
    model_uri = join_uri(ft.run_uri, "model")
    if store.is_published(model_uri):  # whole: a run killed while publishing it trains (resumes) again
        log(f"continual: candidate already trained ({model_uri})")
        return model_uri
    log(f"continual: fine-tuning {ft.train.init_from} for {ft.train.max_steps} steps on {sum(mix.rows.values())} rows")
    from lm.train.trainer import train

    train(ft, store, log, prepare=False)  # as train.trainer says (ray or local)
    return model_uri


def _candidate(registry: Registry, model_uri: str, parent: Version, metrics: dict, ft: Config, mix: Mix,
               n: int, report: str | None) -> Version:
    """The registry version of this iteration's model (registered once, also across resumes), with its gate
    report and iteration: the provenance chain (lm.lineage) follows them."""
    for v in registry.versions():
        if v.model_uri == model_uri:
            return v
    return registry.register(model_uri, parent=parent.id, metrics=metrics, config_hash=ft.fingerprint(),
                             data_manifest=join_uri(mix.data_uri, "manifest.json"), note=f"continual iteration {n}",
                             gate_report=report, iteration=n)


def run_iteration(cfg: Config, store: ObjectStore | None = None, log: Log = print) -> dict:
    """One iteration (see the module docstring); returns its outcome (also in the ledger and
    ``<iteration>/outcome.json``): ``verdict`` promoted / rejected / nothing new, reasons, version."""
    from lm.eval.evaluate import evaluate

    cfg = cfg.with_absolute_paths()  # the mix names shards by URI, and Ray workers run elsewhere
    store = store or ObjectStore(cfg.storage)
    registry = Registry(store, cfg.registry_uri)
    _bootstrap(cfg, store, registry, log)
    ledger = Ledger(store, continual_uri(cfg))
    it = ledger.open_iteration()
    if it is not None:
        log(f"continual: resuming iteration {it['n']} ({len(it['inputs'])} inputs)")
    else:
        new = ledger.new_inputs(list_inputs(cfg, store, log))
        if not new:
            log("continual: nothing new since the last iteration")
            return {"verdict": "nothing new"}
        it = ledger.claim(new)
        log(f"continual: iteration {it['n']}: {len(it['inputs'])} new inputs")
    n, it_uri = it["n"], iteration_uri(cfg, it["n"])
    if not it["inputs"]:  # another job claimed them all first
        return _finish(store, ledger, n, it_uri, {"verdict": "nothing new", "reasons": ["inputs taken by another job"]},
                       log)
    parent = _parent(store, registry, it_uri)
    earlier = [e for e in ledger.iterations() if e["n"] < n]
    mix = build_mix(cfg, store, it_uri, it["inputs"], _tokenizer(store, parent), log=log,
                    earlier_runs=[iteration_uri(cfg, e["n"]) for e in earlier],
                    earlier_inputs=[u for e in earlier for u in e["inputs"]])
    outcome: dict = {"parent": parent.id, "rows": mix.rows, "counts": mix.counts}
    if not mix.rows.get("new") and not mix.rows.get("sft"):
        reason = f"no new data to learn from ({mix.counts.get('documents_note') or 'nothing usable in the inputs'})"
        return _finish(store, ledger, n, it_uri, {**outcome, "verdict": "rejected", "reasons": [reason]}, log)
    ft = fine_tune_config(cfg, n, mix.data_uri, parent.model_uri)
    model_uri = _fine_tune(ft, store, mix, log)
    shown: list[str] = []  # reasons the gate's evaluation printed already
    if mix.gate_texts is None:
        passed, reasons, metrics, report = False, ["FAIL the new data has no held-out part to check it on"], {}, None
    else:
        result = evaluate(gate_config(cfg, n, mix.gate_texts), store, model_uri, log, compare_to=parent.model_uri)
        passed, reasons, report = result.verdict.passed, result.verdict.reasons, result.report_uri
        shown = reasons
        metrics = {k: v for k, v in result.metrics.items() if k.startswith(("fixed/", "new/", "harness/"))}
    version = _candidate(registry, model_uri, parent, metrics, ft, mix, n, report)
    outcome.update(version=version.id, model_uri=model_uri, reasons=reasons, report=report, metrics=metrics)
    current = registry.get(version.id).status
    if current != "candidate":  # decided before an interruption
        return _finish(store, ledger, n, it_uri, {**outcome, "verdict": "promoted" if current in (
            "production", "retired") else "rejected"}, log, shown)
    production = registry.get("production").id
    if passed and production != parent.id:
        passed = False
        reasons = [*reasons, f"FAIL production moved from {parent.id} to {production} during the iteration"]
        outcome["reasons"] = reasons
    if passed:
        registry.promote(version.id, reason=f"continual iteration {n}: gate passed")
    else:
        failed = "; ".join(r for r in reasons if r.startswith("FAIL"))
        registry.reject(version.id, reason=f"continual iteration {n}: " + failed)
    return _finish(store, ledger, n, it_uri, {**outcome, "verdict": "promoted" if passed else "rejected"}, log, shown)


def _bootstrap(cfg: Config, store: ObjectStore, registry: Registry, log: Log) -> None:
    """An empty registry starts from this run's model (``<run>/model``): registered and promoted as the
    first production version. A registry with versions but no production one is an error."""
    if registry.versions():
        registry.get("production")  # fails here, naming the registry, when nothing is in production
        return
    model_uri = join_uri(cfg.run_uri, "model")
    if not store.is_published(model_uri):
        raise RegistryError(f"the registry at {cfg.registry_uri} is empty and there is no model at {model_uri} to "
                            "start from: train one (`lm run` / `lm train`) or `lm registry add` + `promote` one")
    v = registry.register(model_uri, note=f"run {cfg.name}: the first production version")
    registry.promote(v.id, reason="the registry's first version")
    log(f"continual: registry was empty: {model_uri} is {v.id}, in production")


def _tokenizer(store: ObjectStore, version: Version):
    from lm.tokenizer import BPETokenizer

    return BPETokenizer.from_json(store.read_text(join_uri(version.model_uri, "tokenizer.json")))


def _finish(store: ObjectStore, ledger: Ledger, n: int, it_uri: str, outcome: dict, log: Log,
            shown: Collection[str] = ()) -> dict:
    """Record the outcome (its file and the ledger) and print it, with the reasons not ``shown`` already."""
    outcome = {"n": n, **outcome}
    store.write_text(join_uri(it_uri, "outcome.json"), json.dumps(outcome, indent=2, default=str))
    ledger.finish(n, outcome)
    log(f"continual: iteration {n} {outcome['verdict']}"
        + (f" ({outcome['version']})" if outcome.get("version") else ""))
    for reason in outcome.get("reasons", []):
        if reason not in shown:
            log(f"  {reason}")
    return outcome


def watch(cfg: Config, store: ObjectStore | None = None, log: Log = print, *, iterations: int | None = None) -> None:
    """Run an iteration every ``continual.interval_s`` seconds (``iterations`` times, or until stopped);
    a failed iteration is logged and resumed by the next one."""
    store = store or ObjectStore(cfg.storage)
    done = 0
    while iterations is None or done < iterations:
        try:
            run_iteration(cfg, store, log)
        except Exception as err:  # the loop outlives one bad iteration; the next run resumes it
            log(f"continual: iteration failed: {type(err).__name__}: {err}")
        done += 1
        if iterations is None or done < iterations:
            time.sleep(cfg.continual.interval_s)
