"""The data manifest (``<data>/manifest.json``): what a data directory holds, as typed models.

Two kinds, each with one writer and one reader (:func:`read_manifest`):

* :class:`DataManifest` (``kind`` ``text`` or ``sft``): written by lm.data.pipeline, the shards of a corpus
  with their counts, sources, dedup and skipped objects, the tokenizer and the corpus index;
* :class:`MixManifest` (``kind`` ``continual-mix``): written by lm.continual.increment, a continual-learning
  iteration's training mix, whose shards are named by URI (new data, feedback, replay).

Both say which shards make each split (:meth:`BaseManifest.shards_of`), so the trainers, evaluation and
tools read either the same way. Unknown keys are refused: a manifest of another version is re-made, not
half-read.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from lm.config import join_uri
from lm.data.objects import SourceObject
from lm.data.split import SplitName
from lm.storage import ObjectStore, StorageError

FORMAT = "lmforge.data/2"  # /2: a corpus index (index-<fingerprint>/) beside the shards
MANIFEST = "manifest.json"


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenizerEntry(Entry):
    path: str = "tokenizer.json"  # relative to the data directory
    hash: str
    vocab_size: int
    eos_id: int
    pad_id: int | None = None

    @classmethod
    def of(cls, tok) -> TokenizerEntry:
        """The entry of a lm.tokenizer.BPETokenizer saved as ``tokenizer.json`` beside the manifest."""
        return cls(hash=tok.fingerprint(), vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id)


class ShardEntry(Entry):
    path: str  # relative to the data directory, or a whole URI (a continual mix's)
    split: str
    rows: int  # rows of row_length tokens
    tokens: int | None = None
    docs: int | None = None
    dropped_tail_tokens: int | None = None  # the last document's tokens that did not fill a row
    loss_tokens: int | None = None  # supervised shards: tokens that carry a loss
    sha256: str | None = None


class SplitTotals(Entry):
    rows: int = 0
    shards: int = 0
    docs: int = 0
    tokens: int = 0  # sft: the responses' tokens (with end-of-text), those that carry a loss
    bytes: int = 0  # UTF-8 bytes of those tokens' text (bits per byte)


def in_split_order(by_split: dict[str, Any]) -> list[tuple[str, Any]]:
    """``by_split``'s items in the order train, val, test (other names after them, as they came)."""
    order = get_args(SplitName)
    return sorted(by_split.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def add_shards(splits: dict[str, SplitTotals], shards: list[ShardEntry]) -> dict[str, SplitTotals]:
    """``splits`` with each shard's rows (and one shard) added to its split's totals."""
    for s in shards:
        totals = splits.setdefault(s.split, SplitTotals())
        totals.rows += s.rows
        totals.shards += 1
    return splits


class SourceSplit(Entry):
    docs: int
    unique_docs: int
    tokens: int
    bytes: int


class SourceTotals(Entry):
    weight: float
    files: int = 0
    dropped: dict[str, int] = {}  # documents dropped, by reason (cleaning, language, quality, contaminated)
    redacted: dict[str, int] = {}  # PII / secrets replaced by placeholders, by kind (lm.data.pii)
    lines_removed: int = 0  # boilerplate lines removed from kept documents (lm.data.quality)
    splits: dict[str, SourceSplit] = {}
    objects: list[SourceObject] = []  # what it was read from (lm.data.objects): S3 ETags, local size/mtime/sha256


class Decontamination(Entry):
    """What the train split was decontaminated against (lm.data.decontam)."""

    ngram: int  # words per n-gram
    against: list[str]  # held-out splits, eval sets (eval-<name>), further sources
    ngrams: int  # distinct n-grams of those texts
    skipped: list[str] = []  # eval sets that could not be read (not there yet)
    dropped: int = 0  # train documents dropped (reason contaminated)


class BaseManifest(Entry):
    format: str = FORMAT
    inputs_fingerprint: str
    seq_len: int
    row_length: int  # seq_len + 1: inputs are row[:-1], targets row[1:]
    tokenizer: TokenizerEntry
    shards: list[ShardEntry]
    splits: dict[str, SplitTotals]

    def shards_of(self, data_uri: str, split: str) -> list[str]:
        """The URIs of ``split``'s shards (paths are relative to ``data_uri`` unless they are URIs)."""
        found = [shard_uri(data_uri, s.path) for s in self.shards if s.split == split]
        if not found:
            raise ValueError(f"{data_uri}: the manifest has no shards for split {split!r}")
        return found

    def tokenizer_uri(self, data_uri: str) -> str:
        return join_uri(data_uri, self.tokenizer.path)

    def rows_in(self, split: str) -> int:
        return self.splits[split].rows if split in self.splits else 0

    def tokens_per_byte(self, split: str = "val") -> float | None:
        """Tokens per UTF-8 byte of ``split`` (bits per byte from a loss), None when not recorded."""
        totals = self.splits.get(split)
        return totals.tokens / totals.bytes if totals and totals.bytes else None

    def dumps(self) -> bytes:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True).encode()


class DataManifest(BaseManifest):
    kind: Literal["text", "sft"] = "text"
    config_hash: str
    sources: dict[str, SourceTotals]
    dropped: dict[str, int]  # documents dropped, by reason
    redacted: dict[str, int] = {}  # placeholders put in, by kind (email, ip, phone, card, secret)
    lines_removed: int = 0  # boilerplate lines removed
    decontamination: Decontamination | None = None
    dedup: dict[str, int]  # exact / near duplicates removed (corpus_*: of an existing corpus)
    skipped_objects: list[dict[str, Any]]  # {source, uri, reason, detail}
    files: int
    index: str | None = None  # the corpus index folder (hash + MinHash signature of each kept document)
    texts: dict[str, str] = {}  # split -> JSONL of its documents' texts, when asked for
    sft: dict[str, Any] | None = None  # the supervised format's settings (kind sft)

    def summary_line(self) -> str:
        """The corpus in one line: documents and tokens per split, shards, vocabulary, what was removed."""
        splits = ", ".join(f"{s} {e.docs:,} docs / {e.tokens:,} tokens" for s, e in in_split_order(self.splits))
        removed = [f"{n:,} {kind.replace('_', ' ') if 'duplicate' in kind else f'{kind} duplicates'}"
                   for kind, n in self.dedup.items() if n]
        removed += [f"{n:,} {reason}" for reason, n in sorted(self.dropped.items()) if n]
        return (f"{splits}; {len(self.shards)} shards, vocabulary {self.tokenizer.vocab_size:,}; removed: "
                f"{', '.join(removed) or 'nothing'}; {len(self.skipped_objects)} objects skipped")

    def summary_table(self) -> str:
        """A plain-text table of documents, tokens and bytes per source and split."""
        lines = [f"{'source':<20} {'split':<6} {'docs':>9} {'tokens':>12} {'bytes':>13}  dropped"]
        for name, src in self.sources.items():
            dropped = ", ".join(f"{k}={v}" for k, v in sorted(src.dropped.items())) or "-"
            for split, e in in_split_order(src.splits):
                lines.append(f"{name:<20} {split:<6} {e.docs:>9,} {e.tokens:>12,} {e.bytes:>13,}  {dropped}")
                dropped = ""
        for split, e in in_split_order(self.splits):
            lines.append(f"{'TOTAL':<20} {split:<6} {e.docs:>9,} {e.tokens:>12,} {e.bytes:>13,}  "
                         f"{e.rows:,} rows in {e.shards} shards")
        d = self.dedup
        lines.append(f"dedup: {d['exact']} exact, {d['near']} near; skipped objects: {len(self.skipped_objects)}")
        if self.redacted or self.lines_removed:
            lines.append("redacted: " + (", ".join(f"{k}={v}" for k, v in sorted(self.redacted.items())) or "-")
                         + f"; boilerplate lines removed: {self.lines_removed}")
        if (dc := self.decontamination) is not None:
            lines.append(f"decontamination: {dc.dropped} train documents share a {dc.ngram}-gram with "
                         f"{', '.join(dc.against) or 'nothing'} ({dc.ngrams:,} n-grams)"
                         + (f"; not read: {', '.join(dc.skipped)}" if dc.skipped else ""))
        by_source: dict[str, dict[str, int]] = {}
        for s in self.skipped_objects:  # older manifests' entries have no source
            reasons = by_source.setdefault(s.get("source", "?"), {})
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        lines += [f"  {source}: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items()))
                  for source, reasons in sorted(by_source.items())]
        return "\n".join(lines)


class MixManifest(BaseManifest):
    kind: Literal["continual-mix"]
    parts: dict[str, int]  # train rows by origin: new, sft, replay
    counts: dict[str, Any]  # what was read and dropped, for the iteration's report
    inputs: dict[str, str]  # the objects the iteration took: URI -> ETag
    new_data: str | None = None  # the data directory of the new documents (its manifest lists their objects)
    replay_from: str | None = None  # the data directory the replay rows were drawn from


def shard_uri(data_uri: str, path: str) -> str:
    """A manifest's shard path as a URI: relative to the data folder unless it is one already."""
    return path if "://" in path or path.startswith("/") else join_uri(data_uri, path)


def parse_manifest(text: str, uri: str) -> DataManifest | MixManifest:
    raw = json.loads(text)
    if raw.get("format") != FORMAT:
        raise StorageError(f"{uri}: a data manifest of format {raw.get('format')!r}, not {FORMAT!r}; "
                           "prepare the data again with this version (`lm data prepare`)")
    model = MixManifest if raw.get("kind") == "continual-mix" else DataManifest
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise StorageError(f"{uri}: not a valid data manifest: {err}") from err


def read_manifest(store: ObjectStore, data_uri: str) -> DataManifest | MixManifest:
    """The manifest of the data directory ``data_uri`` (StorageError naming it when missing or invalid)."""
    uri = join_uri(data_uri, MANIFEST)
    if not store.exists(uri):
        raise StorageError(f"{uri}: no data manifest there (run `lm data prepare` first)")
    return parse_manifest(store.read_text(uri), uri)
