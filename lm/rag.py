"""Retrieval-augmented generation: a BM25 index (bm25s) of passages cut from text sources, stored under
one URI, and the prompt that puts the best passages in front of a question. No Ray, no model.

    lm rag build -c configs/shakespeare-cpu.yaml                 # rag.sources → rag.index
    lm rag search -c configs/shakespeare-cpu.yaml "the king's crown"   # the top-k passages, with scores

The index folder: ``manifest.json`` (format, counts, sources, settings), ``passages.jsonl`` (one
``{"id", "doc", "source", "text"}`` per passage, in index order) and bm25s's own files under ``bm25/``;
it is published atomically, so readers never see half an index. Serving (``serve.rag: true``) loads it
in every ingress replica; a request with ``"rag": true`` (or ``{"top_k": k}``) gets the passages in its
prompt (``rag.template``) and their sources in the response.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm.config import Config, DataConfig, join_uri
from lm.storage import ObjectStore

FORMAT = "lmforge.rag/1"


class RagError(ValueError):
    """An index that cannot be built or read (the message names the URI or the setting)."""


def cut_passages(text: str, words: int, overlap: int) -> list[str]:
    """Windows of ``words`` words, consecutive ones sharing ``overlap`` (the last may be shorter)."""
    tokens = text.split()
    if not tokens:
        return []
    step = words - overlap
    return [" ".join(tokens[i : i + words]) for i in range(0, max(len(tokens) - overlap, 1), step)]


def _bm25_tokens(texts: list[str]) -> list[list[str]]:
    import bm25s

    return bm25s.tokenize(texts, return_ids=False, stopwords="english", show_progress=False)


def iter_passages(cfg: Config, store: ObjectStore) -> Iterator[dict[str, str]]:
    """Every passage of every kept document of ``rag.sources`` (read and cleaned as the data pipeline does)."""
    from lm.data.documents import iter_documents

    rc = cfg.rag
    # cleaned only: a knowledge base's short passages are not web pages (no language, quality or PII step)
    data = DataConfig(sources=rc.sources, val_fraction=0.0, test_fraction=0.0, clean=cfg.data.clean, languages=[],
                      quality={"enabled": False}, pii={"enabled": False})
    for doc in iter_documents(store, data):
        for j, text in enumerate(cut_passages(doc.text, rc.passage_words, rc.overlap_words)):
            yield {"id": f"{doc.id}#{j}", "doc": doc.id, "source": doc.source, "text": text}


def build_index(cfg: Config, store: ObjectStore | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Index ``rag.sources`` into ``cfg.rag_uri``; returns the manifest."""
    import bm25s

    store = store or ObjectStore(cfg.storage)
    if not cfg.rag.sources:
        raise RagError("rag.sources is empty: name the text sources to index")
    start = time.perf_counter()
    passages = list(iter_passages(cfg, store))
    if not passages:
        raise RagError(f"rag.sources ({', '.join(s.uri for s in cfg.rag.sources)}) hold no text to index")
    log(f"rag: {len(passages):,} passages from {len({p['doc'] for p in passages}):,} documents; indexing")
    retriever = bm25s.BM25()
    retriever.index(_bm25_tokens([p["text"] for p in passages]), show_progress=False)
    manifest = {"format": FORMAT, "passages": len(passages), "documents": len({p["doc"] for p in passages}),
                "sources": [s.model_dump() for s in cfg.rag.sources], "passage_words": cfg.rag.passage_words,
                "overlap_words": cfg.rag.overlap_words, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="lm-rag-") as tmp:
        folder = Path(tmp)
        retriever.save(str(folder / "bm25"), show_progress=False)
        with open(folder / "passages.jsonl", "w") as f:
            for p in passages:
                f.write(json.dumps(p) + "\n")
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        store.publish_dir(folder, cfg.rag_uri)
    log(f"rag: index of {len(passages):,} passages at {cfg.rag_uri} ({time.perf_counter() - start:.1f} s)")
    return manifest


@dataclass
class RagIndex:
    """A loaded index: ``search(query, k)`` returns the best passages with their BM25 scores."""

    uri: str
    retriever: Any
    passages: list[dict[str, str]]

    @classmethod
    def load(cls, store: ObjectStore, uri: str) -> RagIndex:
        import bm25s

        from lm.storage import StorageNotFound

        try:
            manifest = json.loads(store.read_text(join_uri(uri, "manifest.json")))
        except StorageNotFound:
            raise RagError(f"no retrieval index at {uri} (build one with `lm rag build`)") from None
        if manifest.get("format") != FORMAT:
            raise RagError(f"{uri} holds an index of format {manifest.get('format')!r}, not {FORMAT!r}")
        with tempfile.TemporaryDirectory(prefix="lm-rag-") as tmp:
            folder = store.download_dir(uri, tmp)
            retriever = bm25s.BM25.load(str(Path(folder) / "bm25"), show_progress=False)
            passages = [json.loads(line) for line in (Path(folder) / "passages.jsonl").read_text().splitlines()]
        if len(passages) != manifest["passages"]:
            raise RagError(f"{uri}: passages.jsonl has {len(passages)} passages, "
                           f"the manifest says {manifest['passages']}")
        return cls(uri, retriever, passages)

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """Up to ``k`` passages sharing a word with ``query``, best first (``score``: BM25)."""
        tokens = _bm25_tokens([query])
        if not tokens[0]:
            return []
        ids, scores = self.retriever.retrieve(tokens, k=min(k, len(self.passages)), show_progress=False)
        return [{**self.passages[int(i)], "score": round(float(s), 4)}
                for i, s in zip(ids[0], scores[0], strict=True) if s > 0]


def augment(template: str, prompt: str, hits: list[dict[str, Any]], fits: Callable[[str], bool]) -> tuple[str, list]:
    """The prompt with as many of ``hits`` (best first) as ``fits`` accepts, and the hits used."""
    used: list[dict[str, Any]] = []
    for hit in hits:
        context = "\n".join(f"[{i + 1}] {h['text']}" for i, h in enumerate([*used, hit]))
        if not fits(template.format(context=context, prompt=prompt)):
            break
        used.append(hit)
    if not used:
        return prompt, []
    context = "\n".join(f"[{i + 1}] {h['text']}" for i, h in enumerate(used))
    return template.format(context=context, prompt=prompt), used
