"""The ledger of what continual learning has consumed: each iteration's inputs (object URI + ETag)
and how it ended, kept in object storage so that no input is ever learned from twice.

    ledger = Ledger(store, continual_root(cfg.registry_uri))
    todo = ledger.new_inputs(store.list_etags(prefix) | ...)   # objects (or new versions of them) not yet taken
    it = ledger.open_iteration() or ledger.claim(todo)         # an interrupted iteration is resumed, not re-claimed
    ...                                                        # prepare, fine-tune, gate
    ledger.finish(it["n"], {"verdict": "promoted", "version": "v000004"})

Layout: ``iterations/iNNNNNN.json`` (the claim: its inputs, when) and ``iterations/iNNNNNN.done.json``
(the outcome). A claim is created only if its number is free (``ObjectStore.create_if_absent``); a
job that loses the race re-reads the ledger and claims what is still free, so two jobs never take
the same input. Inputs are (URI, ETag) pairs: an object rewritten in place is new input again.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from lm.config import join_uri
from lm.storage import ObjectStore


def continual_root(registry_uri: str) -> str:
    """Where continual learning keeps its ledger and its iterations' folders: ``<registry>/continual``."""
    return join_uri(registry_uri, "continual")


class LedgerError(RuntimeError):
    """The ledger cannot do what was asked (e.g. finishing an iteration that was never claimed)."""


class Ledger:
    def __init__(self, store: ObjectStore, uri: str, *, max_retries: int = 100):
        self.store, self.uri, self.max_retries = store, uri.rstrip("/"), max_retries

    def _folder(self) -> str:
        return join_uri(self.uri, "iterations")

    def iterations(self) -> list[dict[str, Any]]:
        """Every claimed iteration, oldest first, with its ``outcome`` (None while it is open)."""
        names = [u.rsplit("/", 1)[-1] for u in self.store.list(self._folder() + "/")]
        done = {n.split(".")[0] for n in names if n.endswith(".done.json")}
        out = []
        for name in sorted(n for n in names if n.endswith(".json") and not n.endswith(".done.json")):
            claim = json.loads(self.store.read_text(join_uri(self._folder(), name)))
            stem = name[: -len(".json")]
            claim["outcome"] = (json.loads(self.store.read_text(join_uri(self._folder(), f"{stem}.done.json")))
                                if stem in done else None)
            out.append(claim)
        return out

    def seen(self) -> set[tuple[str, str]]:
        """(URI, ETag) of every input any iteration has claimed, finished or not."""
        return {(uri, tag) for it in self.iterations() for uri, tag in it["inputs"].items()}

    def new_inputs(self, listing: dict[str, str]) -> dict[str, str]:
        """The part of ``listing`` (URI -> ETag) that no iteration has claimed."""
        seen = self.seen()
        return {uri: tag for uri, tag in sorted(listing.items()) if (uri, tag) not in seen}

    def open_iteration(self) -> dict[str, Any] | None:
        """The oldest claimed iteration without an outcome (a job that was interrupted), if any."""
        return next((it for it in self.iterations() if it["outcome"] is None), None)

    def claim(self, inputs: dict[str, str]) -> dict[str, Any]:
        """Claim ``inputs`` as the next iteration; inputs another job claimed meanwhile are dropped
        (the claim may end up empty: ``inputs == {}``)."""
        for attempt in range(self.max_retries):
            its = self.iterations()
            taken = {(u, t) for it in its for u, t in it["inputs"].items()}
            free = {u: t for u, t in inputs.items() if (u, t) not in taken}
            n = its[-1]["n"] + 1 if its else 1
            claim = {"n": n, "inputs": free, "claimed_at": time.time()}
            if self.store.create_if_absent(join_uri(self._folder(), f"i{n:06d}.json"), json.dumps(claim).encode()):
                return {**claim, "outcome": None}
            time.sleep(random.uniform(0, 0.01 * min(attempt + 1, 20)))
        raise LedgerError(f"could not claim an iteration in {self.uri} after {self.max_retries} tries")

    def finish(self, n: int, outcome: dict[str, Any]) -> None:
        """Record how iteration ``n`` ended (once: a second outcome is refused)."""
        if not self.store.exists(join_uri(self._folder(), f"i{n:06d}.json")):
            raise LedgerError(f"iteration {n} was never claimed in {self.uri}")
        body = json.dumps({**outcome, "finished_at": time.time()}).encode()
        if not self.store.create_if_absent(join_uri(self._folder(), f"i{n:06d}.done.json"), body):
            raise LedgerError(f"iteration {n} in {self.uri} has already finished")
