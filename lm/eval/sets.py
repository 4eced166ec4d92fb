"""Eval sets → the packed rows the scorers read, and the prompt sets of the generation metrics (no Ray).

A set is a split of the run's shards or any text source (a file, folder or glob in a folder or on S3,
read and cleaned like ``data.sources``: .txt / .jsonl / .parquet, optionally .gz / .zst). Never whole
in memory: a set is an iterator of bounded pieces (a Parquet row group of the shards, or
``PIECE_ROWS`` rows of a text set), read as they are scored, and stops at ``max_rows`` rows:

* split, the model's tokenizer made the shards: the shards' rows as they are (``shard_uris`` set, so
  the Ray backend reads the files itself); supervised shards (``data.format: sft``) are scored through
  their loss masks (``masked``: each :class:`Piece` carries its rows' mask), so only the responses are
  scored, as in training;
* split, another tokenizer made them: the rows are decoded with the data's tokenizer and re-encoded
  with the model's, so bits per byte compare across tokenizers;
* text: :func:`packed_rows`: every token is scored exactly once, so the scored bytes are the text's.

The n-gram baseline's fitting sample (:func:`ngram_train_rows`) is the train split's first rows, at most
``eval.ngram_max_train_tokens`` tokens: the one set held whole, bounded by that setting.

Prompt sets are JSONL (``{"prompt", "reference"}`` or ``{"prompt", "label"}``) at a URI, or ``builtin``:
made deterministically from held-out speeches of the bundled tinyshakespeare (no download).

    found = load_set(store, cfg, cfg.eval.sets[0], tokenizer, seq_len=64)   # EvalRows
    for piece in found.pieces: ...                                           # Piece(rows, loss_mask)
    examples = prompt_set(store, cfg, "builtin", "labelled")                 # [{"prompt", "label"}, ...]
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice, pairwise

import numpy as np

from lm.config import Config, DataConfig, SourceConfig
from lm.config.eval import EvalSetConfig
from lm.data.clean import clean_text
from lm.data.manifest import read_manifest
from lm.data.sources import DataError, plan_files, read_file_task
from lm.data.split import assign_split
from lm.data.stream import ParquetSplit
from lm.storage import ObjectStore, StorageError
from lm.tokenizer import BPETokenizer

BUILTIN = "builtin"
SHAKESPEARE = "bundled://tinyshakespeare"
SPEAKERS = 4  # the builtin labelled set: the corpus's most frequent speakers


PIECE_ROWS = 256  # rows of a text set packed (and scored) at once
ENCODE_BATCH = 256  # documents tokenized at once


@dataclass(frozen=True)
class Piece:
    """A bounded piece of an eval set: ``rows`` [k, seq_len + 1] (-1: padding, lm.eval.metrics) and, for
    supervised shards, their ``loss_mask`` (the same shape; 0: read, not scored). ``len``: its rows."""

    rows: np.ndarray
    loss_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class EvalRows:
    """One eval set, never whole in memory: ``pieces`` yields its rows a bounded piece at a time, in
    order (a row group of the shards, or :data:`PIECE_ROWS` rows of a text set); reading starts at the
    first piece and the iterator is used once."""

    name: str
    source: str  # what is read, for the report
    pieces: Iterator[Piece]
    n_rows: int | None  # known before reading (shards: the manifest's count); None: a text set
    shard_uris: list[str] | None = None  # the rows are exactly these shards (the Ray backend reads the files)
    masked: bool = False  # the shards' loss masks apply (their ``loss_mask`` column)
    note: str = ""


def _cut(flat: np.ndarray, n_rows: int, seq_len: int) -> np.ndarray:
    return flat[np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]]


def packed_rows(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int, max_rows: int | None = None,
                piece_rows: int = PIECE_ROWS) -> Iterator[np.ndarray]:
    """``eos doc1 eos doc2 eos …`` cut into rows of ``seq_len + 1`` that overlap by one token, so every
    token after the leading end-of-text is a target exactly once; the last row is padded with -1. Yields
    pieces of at most ``piece_rows`` rows, ``max_rows`` rows in all, and reads ``token_lists`` no further
    than those rows need: memory holds a piece and the document being cut."""
    cap = math.inf if max_rows is None else max_rows
    buf, have, made = [np.array([eos_id], np.int32)], 1, 0
    for tokens in token_lists:
        buf += [np.asarray(tokens, np.int32).reshape(-1), np.array([eos_id], np.int32)]
        have += len(buf[-2]) + 1
        if have < min(piece_rows, cap - made) * seq_len + 1:
            continue
        flat, start = np.concatenate(buf), 0
        while made < cap and len(flat) - start >= (k := min(piece_rows, cap - made)) * seq_len + 1:
            yield _cut(flat[start:], k, seq_len)
            start, made = start + k * seq_len, made + k
        if made >= cap:
            return
        buf, have = [flat[start:]], len(flat) - start
    flat = np.concatenate(buf)
    if made < cap and (len(flat) > 1 or made == 0):  # the tail: one token left is the last row's last target
        k = min(max(1, -(-(len(flat) - 1) // seq_len)), cap - made)
        padded = np.full(k * seq_len + 1, -1, dtype=np.int32)
        padded[: len(flat)] = flat[: len(padded)]
        yield _cut(padded, k, seq_len)


def text_rows(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Every row of :func:`packed_rows` at once (a few documents: tests, prompts)."""
    return np.concatenate(list(packed_rows(token_lists, seq_len, eos_id)))


def iter_texts(store: ObjectStore, cfg: Config, source: SourceConfig) -> Iterator[str]:
    """The cleaned documents of a text source, one at a time (the read + clean stages of lm.data, one
    process); a source with no usable document raises DataError once read through."""
    data = DataConfig(sources=[source], clean=cfg.data.clean, max_file_mb=cfg.data.max_file_mb)
    found, skipped = 0, []
    for task in plan_files(store, data):  # DataError / StorageError name a source that matches nothing
        for row in read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=data.clean,
                                  max_file_bytes=int(data.max_file_mb * 2**20)):
            if row["reason"]:
                if len(skipped) < 3:  # a few, for the message
                    skipped.append(f"{row['id']}: {row['reason']}")
                continue
            text, reason = clean_text(row["text"], data.clean)
            if not reason:
                found += 1
                yield text
    if not found:
        raise DataError(f"eval source {source.uri!r}: no usable documents ({'; '.join(skipped) or 'all dropped'})")


def _encoded(tok: BPETokenizer, texts: Iterable[str]) -> Iterator[list[int]]:
    """The token ids of each text, tokenized :data:`ENCODE_BATCH` texts at a time."""
    it = iter(texts)
    while batch := list(islice(it, ENCODE_BATCH)):
        yield from tok.encode_batch(batch)


def _documents(pieces: Iterable[Piece], tok: BPETokenizer) -> Iterator[str]:
    """The documents packed in the rows of ``pieces`` (a stream of ``doc eos doc eos …``), decoded with
    ``tok``; a document cut by a piece's end is carried into the next."""
    carry = np.zeros(0, dtype=np.int32)
    for piece in pieces:
        flat = np.concatenate([carry, piece.rows.reshape(-1)])
        start = 0
        for end in np.flatnonzero(flat == tok.eos_id):
            if end > start and (text := tok.decode(flat[start:end].tolist())):
                yield text
            start = end + 1
        carry = flat[start:]
    if len(carry) and (text := tok.decode(carry.tolist())):
        yield text


def _shard_pieces(store: ObjectStore, uris: list[str], max_rows: int | None, masked: bool) -> Iterator[Piece]:
    """The rows of the shards at ``uris`` in order, one Parquet row group at a time, the first ``max_rows``
    of them (no row group past those is read); ``masked``: with their loss masks."""
    split = ParquetSplit.of_uris(uris, store.pyarrow_filesystem)
    left = split.rows if max_rows is None else max_rows
    for i in range(len(split.unit_rows)):
        if left <= 0:
            return
        rows, mask = split.read(i)
        rows = rows[:left]
        left -= len(rows)
        yield Piece(rows, mask[: len(rows)] if masked and mask is not None else None)


def split_rows(store: ObjectStore, cfg: Config, split: str, tok: BPETokenizer, seq_len: int,
               max_rows: int | None = None, every_token: bool = False) -> EvalRows:
    """The rows of a split of the run's shards, in ``tok``'s tokens (see the module doc), the first
    ``max_rows`` of them. Supervised shards (``data.format: sft``) are scored on their responses, as
    they train, unless ``every_token``."""
    data = cfg.data_uri
    manifest = read_manifest(store, data)
    if split not in manifest.splits:
        raise DataError(f"{data}: the manifest has no {split!r} split (splits: {sorted(manifest.splits)})")
    source = f"split {split} of {data}"
    uris = manifest.shards_of(data, split)
    if manifest.tokenizer.hash == tok.fingerprint():
        if manifest.row_length > seq_len + 1:
            raise DataError(f"{data}: rows of {manifest.row_length} tokens exceed the model's context "
                            f"({seq_len} + 1)")
        masked = manifest.kind == "sft" and not every_token
        rows = manifest.rows_in(split)
        return EvalRows(split, source, _shard_pieces(store, uris, max_rows, masked),
                        rows if max_rows is None else min(rows, max_rows), uris if max_rows is None else None,
                        masked, "supervised rows: scored on the responses" if masked else "")
    data_tok = BPETokenizer.from_json(store.read_text(manifest.tokenizer_uri(data)))
    docs = _documents(_shard_pieces(store, uris, None, False), data_tok)  # read only as far as the rows need
    rows = packed_rows(_encoded(tok, docs), seq_len, tok.eos_id, max_rows)
    return EvalRows(split, source, map(Piece, rows), None,
                    note="re-tokenized: the shards were made with another tokenizer")


def load_set(store: ObjectStore, cfg: Config, spec: EvalSetConfig, tok: BPETokenizer, seq_len: int,
             max_rows: int | None = None) -> EvalRows:
    """The rows of one configured eval set, the first ``max_rows`` of them (None: all, a piece at a time)."""
    if spec.split is not None:
        found = split_rows(store, cfg, spec.split, tok, seq_len, max_rows)
        found.name = spec.name
        return found
    source = SourceConfig(name=spec.name, uri=spec.uri, format=spec.format, delimiter=spec.delimiter,
                          text_field=spec.text_field)
    texts = iter_texts(store, cfg, source)
    rows = packed_rows(_encoded(tok, texts), seq_len, tok.eos_id, max_rows)
    return EvalRows(spec.name, spec.uri, map(Piece, rows), None)


def ngram_train_rows(store: ObjectStore, cfg: Config, tok: BPETokenizer, seq_len: int,
                     max_tokens: int) -> tuple[np.ndarray | None, str]:
    """The first rows of the train split (in ``tok``'s tokens), at most ``max_tokens`` tokens: the
    n-gram's fitting sample, bounded by that setting (eval.ngram_max_train_tokens) whatever the split's
    size; no shard is read past it. (None, why) if there are none."""
    try:
        found = split_rows(store, cfg, "train", tok, seq_len, max_rows=max(1, max_tokens // (seq_len + 1)),
                           every_token=True)
        parts = [piece.rows for piece in found.pieces]
    except (DataError, StorageError) as err:
        return None, f"no n-gram baseline: {err}"
    if not parts:
        return None, f"no n-gram baseline: {found.source} has no rows"
    rows = np.concatenate(parts)  # bounded: max_tokens tokens at most
    return rows, f"fitted on {rows.size:,} tokens of {found.source}" + (f" ({found.note})" if found.note else "")


# ------------------------------------------------------------------------------------ prompt sets


def read_jsonl(store: ObjectStore, uri: str, fields: Sequence[str]) -> list[dict[str, str]]:
    """Records of a JSONL file that hold every one of ``fields`` as a string; bad lines name the file and line."""
    out = []
    for lineno, line in enumerate(store.read_text(uri).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise DataError(f"{uri}: line {lineno} is not JSON ({err})") from None
        if not isinstance(record, dict) or any(not isinstance(record.get(f), str) for f in fields):
            raise DataError(f"{uri}: line {lineno} needs string fields {list(fields)}")
        out.append({f: record[f] for f in fields})
    if not out:
        raise DataError(f"{uri}: no records")
    return out


_speech_cache: dict[str, list[tuple[str, str, bool]]] = {}  # the bundled corpus never changes


def speeches(store: ObjectStore, cfg: Config) -> list[tuple[str, str, bool]]:
    """(speaker, text, held_out) of every tinyshakespeare speech, in corpus order; held out = not in the
    train split of the run's data settings (the presets read the corpus under this same source)."""
    named = [s for s in cfg.data.sources if s.uri == SHAKESPEARE]
    source = named[0] if named else SourceConfig(name="tinyshakespeare", uri=SHAKESPEARE)
    data = DataConfig(sources=[source], clean=cfg.data.clean)
    held_out_exists = cfg.data.val_fraction + cfg.data.test_fraction > 0
    key = json.dumps([source.model_dump(), data.clean.model_dump(), cfg.data.val_fraction, cfg.data.test_fraction])
    if key in _speech_cache:
        return _speech_cache[key]
    out = []
    for task in plan_files(store, data):
        for row in read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=data.clean,
                                  max_file_bytes=2**31):
            text, reason = clean_text(row["text"], data.clean)
            if row["reason"] or reason or ":\n" not in text:
                continue
            split = assign_split(row["id"], cfg.data.val_fraction, cfg.data.test_fraction)
            out.append((text.split(":\n", 1)[0], text, split != "train" or not held_out_exists))
    _speech_cache[key] = out
    return out


def spread(items: list, limit: int) -> list:
    """At most ``limit`` items evenly spaced over ``items`` (deterministic)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def builtin_continuations(store: ObjectStore, cfg: Config, limit: int) -> list[dict[str, str]]:
    """Held-out speeches of 3+ lines: prompt = speaker line + first line, reference = the second line."""
    found = []
    for _speaker, text, held_out in speeches(store, cfg):
        lines = text.split("\n")
        if held_out and len(lines) >= 3 and lines[2].strip():
            found.append({"prompt": f"{lines[0]}\n{lines[1]}\n", "reference": lines[2]})
    return spread(found, limit)


def builtin_labelled(store: ObjectStore, cfg: Config, limit: int) -> list[dict[str, str]]:
    """Who speaks next: prompt = a speech and a blank line, label = the next (held-out) speech's speaker,
    one of the corpus's 4 most frequent speakers."""
    every = speeches(store, cfg)
    top = {name for name, _ in Counter(s for s, _, _ in every).most_common(SPEAKERS)}
    found = [{"prompt": prev[1] + "\n\n", "label": cur[0] + ":"}
             for prev, cur in pairwise(every) if cur[2] and cur[0] in top]
    return spread(found, limit)


def prompt_set(store: ObjectStore, cfg: Config, uri: str, kind: str, limit: int) -> list[dict[str, str]]:
    """The examples of a generation (``kind="generation"``) or labelled (``"labelled"``) set."""
    if uri == BUILTIN:
        build = builtin_continuations if kind == "generation" else builtin_labelled
        return build(store, cfg, limit)
    fields = ("prompt", "reference") if kind == "generation" else ("prompt", "label")
    return read_jsonl(store, uri, fields)[:limit]
