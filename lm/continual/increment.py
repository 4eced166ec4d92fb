"""One iteration's training data: the new documents through the data pipeline (with the production
tokenizer, deduplicated against the corpus), served feedback as supervised examples, replay rows of
the earlier data, and the mix manifest the trainer reads like any data directory.

    mix = build_mix(cfg, store, iteration_uri, inputs, tokenizer, log)   # inputs: URI -> ETag (the claim)

Layout under the iteration's folder (every step is skipped when its output is already there, so an
interrupted iteration resumes where it was):

    new/            lm.data.pipeline's output for the new documents (+ ``val-texts.jsonl``)
    feedback.jsonl  feedback pairs as text documents (``continual.feedback_as: text``)
    mix/            ``manifest.json`` (shards by URI: new, supervised, replay), ``tokenizer.json``,
                    ``sft-train.parquet`` / ``sft-val.parquet`` (tokens + loss_mask; whole examples per
                    row, padded; a pair longer than a row is left out and counted), ``replay-train.parquet``
                    (rows of the original train split at seeded positions: only their row groups are read)
    gate-new.jsonl  the held-out part of the new data as text: the gate's ``new`` set

The corpus the new documents are deduplicated against is the original data (``data.output``) plus
the new documents of every earlier iteration, through their corpus indexes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lm.config import Config, SourceConfig, join_uri
from lm.continual.feedback import Pair, parse_lines, sft_pairs, sft_tokens
from lm.data.decontam import shard_grams
from lm.data.dedup import CorpusIndex
from lm.data.loader import corpus_index_tables, shard_bytes
from lm.data.manifest import MixManifest, ShardEntry, TokenizerEntry, add_shards, read_manifest
from lm.data.pack import pack_examples
from lm.data.pipeline import prepare_data
from lm.data.sources import DataError, plan_files
from lm.data.split import assign_split
from lm.data.stream import ParquetSplit, Rows, Split
from lm.progress import Log
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer


@dataclass
class Mix:
    data_uri: str  # the mix data directory (manifest.json): what the fine-tuning trainer reads
    gate_texts: str | None  # JSONL of the new data's held-out texts (None: there are none)
    rows: dict[str, int] = field(default_factory=dict)  # train rows by part: new, sft, replay
    counts: dict[str, object] = field(default_factory=dict)  # what was kept and dropped, by reason


def list_inputs(cfg: Config, store: ObjectStore, log: Log = print) -> dict[str, str]:
    """URI -> ETag of every object under ``continual.corpus`` and (``use_feedback``) the feedback logs."""
    found: dict[str, str] = {}
    for src in cfg.continual.corpus:
        try:
            files = [f["uri"] for f in plan_files(store, cfg.data.model_copy(update={"sources": [src]}))]
        except DataError as err:
            log(f"continual: {err}")
            continue
        tags = {u: "bundled" for u in files if u.startswith("bundled://")}  # shipped with lmforge: never change
        for prefix in sorted({u.rsplit("/", 1)[0] for u in files if u not in tags}):
            tags.update(store.list_etags(prefix + "/"))
        found.update({u: tags.get(u, "") for u in files})
    if cfg.continual.use_feedback:
        found.update({u: t for u, t in store.list_etags(cfg.feedback_uri + "/").items() if u.endswith(".jsonl")})
    return found


def is_feedback(cfg: Config, uri: str) -> bool:
    return uri.startswith(cfg.feedback_uri.rstrip("/") + "/")


def corpus_index(cfg: Config, store: ObjectStore, earlier: list[str]) -> CorpusIndex:
    """The original data's corpus index plus those of the earlier iterations' new documents."""
    tables = corpus_index_tables(store, cfg.data_uri)
    for uri in earlier:
        if store.exists(join_uri(uri, "new", "manifest.json")):
            tables += corpus_index_tables(store, join_uri(uri, "new"))
    return CorpusIndex.from_tables(tables, cfg.data.dedup)


def feedback_pairs(cfg: Config, store: ObjectStore, uris: list[str], earlier: list[str]) -> tuple[list[Pair], Counter]:
    """Pairs of the new feedback logs; a rating or correction of a completion logged in an earlier
    (already learned) file is joined with that completion."""
    counts: Counter = Counter()
    records = parse_lines((line for u in uris for line in store.read_text(u).splitlines()), counts)
    have = {r.get("id") for r in records if r.get("type") in ("completion", "chat")}
    wanted = {r.get("id") for r in records if r.get("type") == "feedback"} - have
    if wanted:
        for u in earlier:
            older = parse_lines(store.read_text(u).splitlines(), Counter())
            records += [r for r in older if r.get("type") in ("completion", "chat") and r.get("id") in wanted]
    pairs, more = sft_pairs(records, use_unrated=cfg.continual.use_unrated)
    return pairs, counts + more


def write_sft(cfg: Config, store: ObjectStore, mix_uri: str, tok: BPETokenizer, pairs: list[Pair]
              ) -> tuple[dict[str, ShardEntry], int]:
    """Supervised rows of ``pairs`` by split (the documents' split rule on the pair id), as shards: whole
    examples per row, padded (as lm.data.sft packs them), so a response always sees its whole prompt.
    Returns the shards and how many pairs were left out for being longer than a row."""
    out, too_long = {}, 0
    for split in ("train", "val"):
        examples = [sft_tokens(tok, p) for p in pairs if assign_split(p.id, cfg.data.val_fraction, 0.0) == split]
        fit = [e for e in examples if len(e[0]) <= cfg.seq_len + 1]
        too_long += len(examples) - len(fit)
        rows, mask, _ = pack_examples(fit, cfg.seq_len, pad_id=tok.pad_id)
        keep = mask[:, 1:].sum(axis=1) > 0  # a row with no response target would have no loss at all
        rows, mask = rows[keep], mask[keep]
        if len(rows):
            name, data = f"sft-{split}.parquet", shard_bytes(rows, mask)
            store.write_bytes(join_uri(mix_uri, name), data)
            out[split] = ShardEntry(path=join_uri(mix_uri, name), split=split, rows=len(rows),
                                    sha256=hashlib.sha256(data).hexdigest())
    return out, too_long


def _replay(cfg: Config, store: ObjectStore, mix_uri: str, tok: BPETokenizer, new_rows: int) -> ShardEntry | None:
    """Rows of the original train split, ``replay_ratio`` of the mix, drawn with the train seed."""
    ratio = cfg.continual.replay_ratio
    want = math.ceil(new_rows * ratio / (1 - ratio))
    if want == 0:
        return None
    base = cfg.data_uri
    manifest = read_manifest(store, base)
    if manifest.tokenizer.hash != tok.fingerprint():
        raise DataError(f"{base}: made with another tokenizer than the production model's; it cannot be replayed")
    split = ParquetSplit.of_uris(manifest.shards_of(base, "train"), store.pyarrow_filesystem)
    if not split.rows:
        raise DataError(f"{base}: the train split has no rows to replay")
    rows, mask = replay_rows(split, want, cfg.train.seed)  # want rows: bounded by the new data, not the corpus
    uri, data = join_uri(mix_uri, "replay-train.parquet"), shard_bytes(rows, mask)
    store.write_bytes(uri, data)
    return ShardEntry(path=uri, split="train", rows=want, sha256=hashlib.sha256(data).hexdigest())


def replay_rows(split: Split, want: int, seed: int) -> Rows:
    """``want`` rows of ``split`` drawn with ``seed`` (with replacement only when it has fewer), in the
    order drawn, with their loss masks (SFT data; ones for units without, None when no unit read has one).
    The positions are drawn first; then only the units (row groups) holding one are read, one at a time."""
    picked = np.random.default_rng(seed).choice(split.rows, size=want, replace=want > split.rows)
    starts = np.cumsum([0, *split.unit_rows])
    unit_of = np.searchsorted(starts, picked, side="right") - 1
    order = np.argsort(unit_of, kind="stable")
    units, first = np.unique(unit_of[order], return_index=True)
    rows = mask = None
    for unit, at in zip(units, np.split(order, first[1:]), strict=True):
        got, got_mask = split.read(int(unit))
        local = picked[at] - starts[unit]
        if rows is None:
            rows = np.empty((want, got.shape[1]), got.dtype)
        rows[at] = got[local]
        if got_mask is not None:
            mask = np.ones(rows.shape, np.uint8) if mask is None else mask  # rows of unmasked units: ones
            mask[at] = got_mask[local]
    return rows, mask


def build_mix(cfg: Config, store: ObjectStore, it_uri: str, inputs: dict[str, str], tok: BPETokenizer, *,
              earlier_runs: list[str], earlier_inputs: list[str], log: Log = print) -> Mix:
    """The iteration's data (see the module docstring). ``inputs``: this iteration's claimed objects;
    ``earlier_runs``: the folders of earlier iterations; ``earlier_inputs``: the objects they took."""
    mix_uri = join_uri(it_uri, "mix")
    gate_uri = join_uri(it_uri, "gate-new.jsonl")
    if store.exists(join_uri(mix_uri, "manifest.json")):
        manifest = read_manifest(store, mix_uri)
        log(f"continual: data of this iteration already built ({mix_uri})")
        return Mix(mix_uri, gate_uri if store.exists(gate_uri) else None, manifest.parts, manifest.counts)
    feedback = sorted(u for u in inputs if is_feedback(cfg, u))
    documents = {u for u in inputs if not is_feedback(cfg, u)}
    earlier_feedback = [u for u in earlier_inputs if is_feedback(cfg, u)]
    pairs, fb_counts = feedback_pairs(cfg, store, feedback, earlier_feedback) if feedback else ([], Counter())
    counts: dict[str, object] = {"feedback": dict(fb_counts), "documents": len(documents)}
    sources = list(cfg.continual.corpus)
    if pairs and cfg.continual.feedback_as == "text":
        text_uri = join_uri(it_uri, "feedback.jsonl")
        store.write_text(text_uri, "".join(json.dumps({"text": p.prompt + p.response}) + "\n" for p in pairs))
        sources.append(SourceConfig(name="feedback", uri=text_uri, format="jsonl"))
        documents.add(text_uri)
    shards: list[ShardEntry] = []
    gate_texts: list[str] = []
    parts = {"new": 0, "sft": 0, "replay": 0}
    if documents:
        shards, gate_texts, parts["new"] = _new_documents(cfg, store, it_uri, tok, sources, documents,
                                                          earlier_runs, counts, log)
    sft, too_long = (write_sft(cfg, store, mix_uri, tok, pairs) if pairs and cfg.continual.feedback_as == "sft"
                     else ({}, 0))
    if too_long:
        counts["feedback"]["skipped: longer than a row"] = too_long
    shards += list(sft.values())
    gate_texts += [p.prompt + p.response for p in pairs
                   if cfg.continual.feedback_as == "sft" and assign_split(p.id, cfg.data.val_fraction, 0.0) == "val"]
    parts["sft"] = sft["train"].rows if "train" in sft else 0
    if not parts["new"] + parts["sft"]:
        log("continual: no new training rows in this iteration's inputs")
        return Mix(mix_uri, None, parts, counts)
    replay = _replay(cfg, store, mix_uri, tok, parts["new"] + parts["sft"])
    if replay:
        shards.append(replay)
        parts["replay"] = replay.rows
    if gate_texts:
        store.write_text(gate_uri, "".join(json.dumps({"text": t}) + "\n" for t in gate_texts))
    new_data = join_uri(it_uri, "new") if parts["new"] else None
    _write_manifest(cfg, store, mix_uri, tok, inputs, shards, parts, counts, new_data)
    log(f"continual: training mix → {mix_uri}: {parts['new']} new rows, {parts['sft']} supervised rows, "
        f"{parts['replay']} replay rows; {len(gate_texts)} held-out texts for the gate")
    return Mix(mix_uri, gate_uri if gate_texts else None, parts, counts)


def _new_documents(cfg: Config, store: ObjectStore, it_uri: str, tok: BPETokenizer, sources: list[SourceConfig],
                   documents: set[str], earlier_runs: list[str], counts: dict,
                   log: Log) -> tuple[list[ShardEntry], list[str], int]:
    """This iteration's new documents through lm.data's pipeline under ``<it>/new``, deduplicated against the
    earlier runs' corpora and decontaminated against the corpus's held-out splits: their train and val shards,
    the val texts (for the gate) and the train rows; their counts go into ``counts``. None left (all
    duplicates, say): nothing, and a note in ``counts``."""
    new_uri = join_uri(it_uri, "new")
    inc = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources, "output": new_uri})})
    dc, corpus = cfg.data.decontaminate, read_manifest(store, cfg.data_uri)  # the gate's fixed set: its val split
    held_out = {f"corpus {split}": shard_grams(store, corpus.shards_of(cfg.data_uri, split), tok, dc.ngram)
                for split in dc.splits if dc.enabled and corpus.rows_in(split)}
    try:
        index = corpus_index(cfg, store, earlier_runs)
        new = prepare_data(inc, store, log, tokenizer=tok, known=index, export_texts=("val",), only=documents,
                           held_out=held_out)
    except DataError as err:
        counts["documents_note"] = str(err)
        log(f"continual: no new documents to learn from: {err}")
        return [], [], 0
    counts.update(dropped=new.dropped, dedup=new.dedup, skipped_objects=len(new.skipped_objects))
    shards = [s.model_copy(update={"path": join_uri(new_uri, s.path)})
              for s in new.shards if s.split in ("train", "val")]
    texts = []
    if "val" in new.texts:
        texts = [json.loads(line)["text"] for line in
                 store.read_text(join_uri(new_uri, new.texts["val"])).splitlines() if line.strip()]
    return shards, texts, new.rows_in("train")


def _write_manifest(cfg: Config, store: ObjectStore, mix_uri: str, tok: BPETokenizer, inputs: dict[str, str],
                    shards: list[ShardEntry], parts: dict, counts: dict, new_data: str | None) -> None:
    """The one writer of a :class:`MixManifest` (its tokenizer beside it; every shard with its SHA-256)."""
    store.publish_file(tok.to_json().encode(), join_uri(mix_uri, "tokenizer.json"))
    shards = [ShardEntry(path=s.path, split=s.split, rows=s.rows, sha256=s.sha256) for s in shards]
    fingerprint = hashlib.sha256(json.dumps(sorted(inputs.items())).encode()).hexdigest()[:16]
    manifest = MixManifest(kind="continual-mix", inputs_fingerprint=fingerprint, seq_len=cfg.seq_len,
                           row_length=cfg.seq_len + 1, tokenizer=TokenizerEntry.of(tok), shards=shards,
                           splits=add_shards({}, shards), parts=parts, counts=counts, inputs=inputs,
                           new_data=new_data, replay_from=cfg.data_uri if parts.get("replay") else None)
    store.publish_file(manifest.dumps(), join_uri(mix_uri, "manifest.json"))
