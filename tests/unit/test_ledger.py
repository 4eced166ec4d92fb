"""lm.continual.ledger: inputs are claimed once (even by racing jobs), an interrupted iteration is
resumed, a rewritten object is new input, outcomes are recorded once."""

from __future__ import annotations

import threading

import pytest

from lm.config import join_uri
from lm.continual.ledger import Ledger, LedgerError


def test_claim_finish_resume_and_new_versions(store_root):
    store = store_root.store
    inbox = join_uri(store_root.uri, "inbox")
    for name in ("a.txt", "b.txt"):
        store.write_bytes(join_uri(inbox, name), name.encode())
    ledger = Ledger(store, join_uri(store_root.uri, "continual"))
    assert ledger.open_iteration() is None and ledger.iterations() == []
    todo = ledger.new_inputs(store.list_etags(inbox))
    assert len(todo) == 2
    first = ledger.claim(todo)
    assert first["n"] == 1 and ledger.new_inputs(store.list_etags(inbox)) == {}
    assert ledger.open_iteration()["n"] == 1  # interrupted here: the next run resumes iteration 1
    ledger.finish(1, {"verdict": "promoted", "version": "v000002"})
    with pytest.raises(LedgerError, match="already finished"):
        ledger.finish(1, {"verdict": "rejected"})
    with pytest.raises(LedgerError, match="never claimed"):
        ledger.finish(7, {})
    assert ledger.open_iteration() is None and ledger.iterations()[0]["outcome"]["version"] == "v000002"

    store.write_bytes(join_uri(inbox, "c.txt"), b"c")
    store.write_bytes(join_uri(inbox, "a.txt"), b"a, rewritten")  # a new version of a is new input
    todo = ledger.new_inputs(store.list_etags(inbox))
    assert sorted(u.rsplit("/", 1)[-1] for u in todo) == ["a.txt", "c.txt"]
    assert ledger.claim(todo)["n"] == 2


def test_racing_jobs_never_claim_the_same_input(store_root):
    ledger = Ledger(store_root.store, join_uri(store_root.uri, "continual"))
    inputs = {f"s3://b/inbox/{i}.txt": f"etag{i}" for i in range(12)}
    claims: list[dict] = []

    def job(offset: int) -> None:
        mine = dict(list(inputs.items())[offset : offset + 8])  # overlapping wishes
        claims.append(Ledger(ledger.store, ledger.uri).claim(mine))

    threads = [threading.Thread(target=job, args=(k,)) for k in (0, 2, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    taken = [u for c in claims for u in c["inputs"]]
    assert len(taken) == len(set(taken)) == 12  # every input once, none twice
    assert sorted(c["n"] for c in claims) == [1, 2, 3]
