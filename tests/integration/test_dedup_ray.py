"""Exact and near dedup on Ray Data (lm.data.dedup) over a planted corpus with known answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lm.config import DedupConfig
from lm.data.clean import text_hash
from lm.data.dedup import estimated_jaccard, exact_dedup, minhash_signature, near_dedup, shingles

pytestmark = [pytest.mark.ray]

CFG = DedupConfig()  # threshold 0.8, 128 permutations, 16 bands, 5-word shingles
WORDS = 80
PARTS = 2


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a, CFG.shingle), shingles(b, CFG.shingle)
    return len(np.intersect1d(sa, sb)) / len(np.union1d(sa, sb))


def estimated(a: str, b: str) -> float:
    sig = [minhash_signature(t, CFG.num_perm, CFG.shingle, CFG.seed) for t in (a, b)]
    return estimated_jaccard(*sig)


def edit(text: str, positions: list[int], tag: str) -> str:
    words = text.split()
    for i in positions:
        words[i] = f"{tag}{i}"
    return " ".join(words)


class Corpus:
    """60 random 80-word documents plus planted exact copies, near-duplicates, a chain and decoys."""

    def __init__(self) -> None:
        rng = np.random.default_rng(2024)
        vocab = [f"v{i}" for i in range(3000)]
        self.text = {f"d{i:03d}": " ".join(rng.choice(vocab, WORDS)) for i in range(60)}
        self.rows: list[dict[str, Any]] = []
        for doc_id, text in self.text.items():
            self.add(doc_id, text, "base")
        # exact copies: a copy with a smaller id than its original is the one kept
        self.exact = [["c001", "d001"], ["c002", "d002"], ["d003", "x003"], ["d004", "x004"],
                      ["d005", "x005", "y005"]]
        for group in self.exact:
            original = next(i for i in group if i.startswith("d"))
            for doc_id in group:
                if doc_id != original:
                    self.add(doc_id, self.text[original], "copy")
        # near duplicates (1–3 words changed, Jaccard of 5-shingles ≥ 0.85), incl. one of an exact copy
        near = {"n010": ("d010", [79]), "n011": ("d011", [0, 79]), "n012": ("d012", [77, 78, 79]),
                "b013": ("d013", [40]), "n014": ("d014", [78, 79]), "b015": ("d015", [0, 78, 79]),
                "n001": ("d001", [79])}
        for doc_id, (original, positions) in near.items():
            self.add(doc_id, edit(self.text[original], positions, "near"), "near")
        # a chain: d020 ~ n020a ~ n020b, while d020 and n020b are not similar enough on their own
        self.add("n020a", edit(self.text["d020"], [20], "chain"), "chain")
        self.add("n020b", edit(self.text["n020a"], [50], "chain"), "chain")
        # decoys that share words but not enough shingles: must survive
        half = " ".join(self.text["d030"].split()[:40] + list(rng.choice(vocab, 40)))
        self.add("p030", half, "decoy")
        self.add("p031", edit(self.text["d031"], [10, 30, 50, 70], "decoy"), "decoy")
        self.near_clusters = [["c001", "n001"], ["d010", "n010"], ["d011", "n011"], ["d012", "n012"],
                              ["b013", "d013"], ["d014", "n014"], ["b015", "d015"],
                              ["d020", "n020a", "n020b"]]

    def add(self, doc_id: str, text: str, source: str) -> None:
        self.text[doc_id] = text
        self.rows.append({"id": doc_id, "text": text, "hash": text_hash(text), "source": source,
                          "n_words": len(text.split()), "score": float(len(self.rows)) / 7})

    def survivors(self, clusters: list[list[str]], ids: set[str]) -> set[str]:
        return ids - {x for c in clusters for x in c if x != min(c)}


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return Corpus()


def test_planted_corpus_has_the_intended_similarities(corpus):
    t = corpus.text
    for a, b in [("d010", "n010"), ("d011", "n011"), ("d012", "n012"), ("d013", "b013"),
                 ("d014", "n014"), ("d015", "b015"), ("d001", "n001"), ("d020", "n020a"), ("n020a", "n020b")]:
        assert jaccard(t[a], t[b]) >= 0.85, (a, b)
        assert estimated(t[a], t[b]) >= CFG.threshold, (a, b)
    assert jaccard(t["d020"], t["n020b"]) < CFG.threshold  # the chain's ends only join through n020a
    assert estimated(t["d020"], t["n020b"]) < CFG.threshold
    assert jaccard(t["d030"], t["p030"]) < 0.4 and jaccard(t["d031"], t["p031"]) < 0.65
    assert max(estimated(t["d030"], t["p030"]), estimated(t["d031"], t["p031"])) < 0.7
    assert max(jaccard(t["d040"], t[f"d0{i}"]) for i in range(41, 60)) == 0.0  # base documents are unrelated


def dataset(ray: Any, rows: list[dict[str, Any]], blocks: int, strategy: str) -> Any:
    """A lazy dataset whose shuffles use ``strategy`` (a dataset keeps the DataContext of its creation)."""
    ctx = ray.data.DataContext.get_current()
    old = ctx.shuffle_strategy
    try:
        if strategy != "default":  # default in Ray 2.60: hash shuffle (aggregator actors, ~5 s fixed cost here)
            ctx.shuffle_strategy = strategy
        ds = ray.data.from_items(rows, override_num_blocks=blocks)
    finally:
        ctx.shuffle_strategy = old
    return ds.map_batches(lambda batch: batch)  # not materialized (a lambda: workers can't import this module)


@pytest.mark.parametrize("strategy", ["default", "sort_shuffle_pull_based"])
def test_exact_then_near_dedup_keep_the_smallest_id(ray_session, corpus, strategy):
    ds = dataset(ray_session, corpus.rows, 5, strategy)
    by_id = {r["id"]: r for r in corpus.rows}
    n_in = len(corpus.rows)
    assert n_in == 60 + 6 + 7 + 2 + 2

    exact = exact_dedup(ds, PARTS).materialize()
    after_exact = corpus.survivors(corpus.exact, set(by_id))
    rows = exact.take_all()
    assert sorted(r["id"] for r in rows) == sorted(after_exact)
    assert n_in - exact.count() == 6
    assert all(r == by_id[r["id"]] for r in rows)  # every column kept as it was

    near, n_dropped = near_dedup(exact, CFG, PARTS)  # a materialized input
    expected = corpus.survivors(corpus.near_clusters, after_exact)
    rows = near.take_all()
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert n_dropped == len(after_exact) - len(expected) == 9
    assert {"c001", "b013", "b015", "d020", "p030", "p031", "d030", "d031"} <= expected
    assert all(r == by_id[r["id"]] for r in rows)


def test_near_dedup_without_pairs_returns_the_input(ray_session, corpus):
    ds = dataset(ray_session, [r for r in corpus.rows if r["source"] == "base"], 3, "sort_shuffle_pull_based")
    out, n_dropped = near_dedup(ds, CFG, PARTS)
    assert out is ds and n_dropped == 0
