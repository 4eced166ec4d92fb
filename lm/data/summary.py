"""The data manifest made from the counts the pipeline's stages gathered (lm.data.pipeline hands them over;
pure: no Ray, no I/O).

    manifest = build_manifest(cfg, fingerprint, config_hash, files, tok, shards, per_source, reasons, skipped,
                              removed, texts, decontamination, sft_entry)

``reasons`` are count rows per (source, reason) (``count()``, ``sum(n_bytes)`` and the quality stack's
``sum(<column>)`` of lm.data.quality.COUNT_COLUMNS); reason ``""`` rows are the kept documents.
"""

from __future__ import annotations

from lm.data.dedup import INDEX_KNOWN_EXACT, INDEX_KNOWN_NEAR
from lm.data.manifest import (
    DataManifest,
    Decontamination,
    ShardEntry,
    SourceSplit,
    SourceTotals,
    SplitTotals,
    TokenizerEntry,
    add_shards,
)
from lm.data.objects import SourceObject
from lm.data.quality import COUNT_COLUMNS

REDACTED = "redacted_"


def reason_totals(reasons: list[dict]) -> dict[str, int]:
    """Documents dropped per reason, over every source."""
    totals: dict[str, int] = {}
    for r in reasons:
        if r["reason"]:
            totals[r["reason"]] = totals.get(r["reason"], 0) + r["count()"]
    return dict(sorted(totals.items()))


def _stack_counts(sources: dict[str, SourceTotals], reasons: list[dict]) -> tuple[dict[str, int], int]:
    """Each source's redactions and removed lines (from the rows of ``reasons`` that carry them); the totals."""
    redacted: dict[str, int] = {}
    lines = 0
    for r in reasons:
        src = sources[r["source"]]
        for column in COUNT_COLUMNS:
            n = int(r.get(f"sum({column})", 0))
            if not n:
                continue
            if column.startswith(REDACTED):
                kind = column[len(REDACTED):]
                src.redacted[kind] = src.redacted.get(kind, 0) + n
                redacted[kind] = redacted.get(kind, 0) + n
            else:
                src.lines_removed += n
                lines += n
    return dict(sorted(redacted.items())), lines


def build_manifest(cfg, fingerprint: str, config_hash: str, files: list[dict], tok, shards: list[dict],
                   per_source: list[dict], reasons: list[dict], skipped: list[dict], removed: dict[str, int],
                   texts: dict[str, str], decontamination: Decontamination | None, sft_entry: dict | None,
                   objects: dict[str, list[SourceObject]] | None = None) -> DataManifest:
    """The one writer of a :class:`DataManifest`: the counts the stages gathered, the shards written, the
    source objects read (``objects``, lm.data.objects)."""
    sources = {s.name: SourceTotals(weight=s.weight, objects=(objects or {}).get(s.name, []))
               for s in cfg.data.sources}
    for f in files:
        sources[f["source"]].files += 1
    splits: dict[str, SplitTotals] = {}
    for r in per_source:
        entry = SourceSplit(docs=r["count()"], unique_docs=r["sum(original)"], tokens=r["sum(n_tokens)"],
                            bytes=r["sum(n_bytes)"])
        sources[r["source"]].splits[r["split"]] = entry
        totals = splits.setdefault(r["split"], SplitTotals())
        totals.docs, totals.tokens, totals.bytes = (totals.docs + entry.docs, totals.tokens + entry.tokens,
                                                    totals.bytes + entry.bytes)
    for r in reasons:
        if r["reason"]:
            dropped = sources[r["source"]].dropped
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + r["count()"]
    redacted, lines_removed = _stack_counts(sources, reasons)
    entries = [ShardEntry(**s) for s in shards]
    dropped = reason_totals(reasons)
    return DataManifest(
        kind="sft" if sft_entry is not None else "text", inputs_fingerprint=fingerprint, config_hash=config_hash,
        seq_len=cfg.seq_len, row_length=cfg.seq_len + 1, tokenizer=TokenizerEntry.of(tok), shards=entries,
        splits=add_shards(splits, entries), sources=sources, dropped=dropped, redacted=redacted,
        lines_removed=lines_removed, decontamination=decontamination,
        dedup={"exact": removed["exact"], "near": removed["near"], "corpus_exact": removed[INDEX_KNOWN_EXACT],
               "corpus_near": removed[INDEX_KNOWN_NEAR]},
        skipped_objects=skipped, files=len(files), index=f"index-{fingerprint}", texts=texts, sft=sft_entry)
