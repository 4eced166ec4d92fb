"""Eval sets → the packed rows the scorers read, and the prompt sets of the generation metrics (no Ray).

A set is a split of the run's shards or any text source (a file, folder or glob in a folder or on S3,
read and cleaned like ``data.sources``: .txt / .jsonl / .parquet, optionally .gz / .zst):

* split, the model's tokenizer made the shards: the shards' rows as they are (``shard_uris`` set, so
  the Ray backend reads the files itself); supervised shards (``data.format: sft``) are read here with
  their loss masks, so only the responses are scored, as in training;
* split, another tokenizer made them: the rows are decoded with the data's tokenizer and re-encoded
  with the model's, so bits per byte compare across tokenizers;
* text: :func:`text_rows`: every token is scored exactly once, so the scored bytes are the text's.

Prompt sets are JSONL (``{"prompt", "reference"}`` or ``{"prompt", "label"}``) at a URI, or ``builtin``:
made deterministically from held-out speeches of the bundled tinyshakespeare (no download).

    rows = load_set(store, cfg, cfg.eval.sets[0], tokenizer, seq_len=64)     # EvalRows
    examples = prompt_set(store, cfg, "builtin", "labelled")                 # [{"prompt", "label"}, ...]
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from lm.config import Config, DataConfig, SourceConfig, join_uri
from lm.config.eval import EvalSetConfig
from lm.data.clean import clean_text
from lm.data.loader import read_manifest, read_shard_masked, shard_uris
from lm.data.pipeline import data_uri
from lm.data.sources import DataError, plan_files, read_file_task
from lm.data.split import assign_split
from lm.eval.metrics import hide_targets
from lm.storage import ObjectStore, StorageError
from lm.tokenizer import BPETokenizer

BUILTIN = "builtin"
SHAKESPEARE = "bundled://tinyshakespeare"
SPEAKERS = 4  # the builtin labelled set: the corpus's most frequent speakers


@dataclass
class EvalRows:
    name: str
    source: str  # what was read, for the report
    rows: np.ndarray | None  # [n, seq_len + 1]; negative ids are not scored (lm.eval.metrics); None: read shard_uris
    n_rows: int
    shard_uris: list[str] | None = None  # the rows are these shards as they are (the Ray backend reads them)
    note: str = ""


def text_rows(token_lists: Iterable[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """``eos doc1 eos doc2 eos …`` cut into rows of ``seq_len + 1`` that overlap by one token, so every
    token after the leading end-of-text is a target exactly once; the last row is padded with -1."""
    parts = [np.array([eos_id], dtype=np.int64)]
    for tokens in token_lists:
        parts += [np.asarray(tokens, dtype=np.int64).reshape(-1), np.array([eos_id], dtype=np.int64)]
    stream = np.concatenate(parts)
    n_rows = max(1, -(-(len(stream) - 1) // seq_len))
    padded = np.full(n_rows * seq_len + 1, -1, dtype=np.int64)
    padded[: len(stream)] = stream
    index = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return padded[index]


def read_texts(store: ObjectStore, cfg: Config, source: SourceConfig) -> list[str]:
    """The cleaned documents of a text source (the read + clean stages of lm.data, one process)."""
    data = DataConfig(sources=[source], clean=cfg.data.clean, max_file_mb=cfg.data.max_file_mb)
    texts, skipped = [], []
    for task in plan_files(store, data):  # DataError / StorageError name a source that matches nothing
        for row in read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=data.clean,
                                  max_file_bytes=int(data.max_file_mb * 2**20)):
            if row["reason"]:
                skipped.append(f"{row['id']}: {row['reason']}")
                continue
            text, reason = clean_text(row["text"], data.clean)
            if not reason:
                texts.append(text)
    if not texts:
        raise DataError(f"eval source {source.uri!r}: no usable documents ({'; '.join(skipped[:3]) or 'all dropped'})")
    return texts


def _decode_documents(rows: np.ndarray, tok: BPETokenizer) -> list[str]:
    """The documents packed in ``rows`` (a stream of ``doc eos doc eos …``), decoded with ``tok``."""
    flat = rows.reshape(-1)
    ends = np.flatnonzero(flat == tok.eos_id)
    starts = np.concatenate([[0], ends + 1])
    ends = np.concatenate([ends, [len(flat)]])
    return [text for s, e in zip(starts, ends, strict=True) if e > s and (text := tok.decode(flat[s:e].tolist()))]


def _read_rows(store: ObjectStore, uris: list[str], max_rows: int | None, masked: bool = False) -> np.ndarray:
    """The rows of the shards at ``uris`` in order, reading no more shards than ``max_rows`` needs;
    ``masked``: with their loss masks applied (lm.eval.metrics.hide_targets)."""
    parts, n = [], 0
    for uri in uris:
        rows, mask = read_shard_masked(store, uri)
        parts.append(hide_targets(rows, mask) if masked and mask is not None else rows)
        n += len(parts[-1])
        if max_rows is not None and n >= max_rows:
            break
    return np.concatenate(parts)[:max_rows]


def split_rows(store: ObjectStore, cfg: Config, split: str, tok: BPETokenizer, seq_len: int,
               max_rows: int | None = None, lazy: bool = False, every_token: bool = False) -> EvalRows:
    """The rows of a split of the run's shards, in ``tok``'s tokens (see the module doc); ``lazy``: leave
    shards made with ``tok`` unread (``rows`` None) unless ``max_rows`` cuts them. Supervised shards
    (``data.format: sft``) are scored on their responses, as they train, unless ``every_token``."""
    data = data_uri(cfg)
    manifest = read_manifest(store, data)
    if split not in manifest["splits"]:
        raise DataError(f"{data}: the manifest has no {split!r} split (splits: {sorted(manifest['splits'])})")
    source = f"split {split} of {data}"
    masked = manifest.get("kind") == "sft" and not every_token
    if manifest["tokenizer"]["hash"] == tok.fingerprint():
        if manifest["row_length"] > seq_len + 1:
            raise DataError(f"{data}: rows of {manifest['row_length']} tokens exceed the model's context "
                            f"({seq_len} + 1)")
        uris = shard_uris(manifest, data, split)
        if lazy and max_rows is None and not masked:
            return EvalRows(split, source, None, manifest["splits"][split]["rows"], uris)
        rows = _read_rows(store, uris, max_rows, masked)
        if masked:
            return EvalRows(split, source, rows, len(rows), None, "supervised rows: scored on the responses")
        return EvalRows(split, source, rows, len(rows), uris)
    data_tok = BPETokenizer.from_json(store.read_text(join_uri(data, manifest["tokenizer"]["path"])))
    docs = _decode_documents(_read_rows(store, shard_uris(manifest, data, split), max_rows), data_tok)
    rows = text_rows(tok.encode_batch(docs), seq_len, tok.eos_id)[:max_rows]
    return EvalRows(split, source, rows, len(rows), None, "re-tokenized: the shards were made with another tokenizer")


def load_set(store: ObjectStore, cfg: Config, spec: EvalSetConfig, tok: BPETokenizer, seq_len: int,
             max_rows: int | None = None, lazy: bool = False) -> EvalRows:
    """The rows of one configured eval set (``lazy``: see :func:`split_rows`)."""
    if spec.split is not None:
        found = split_rows(store, cfg, spec.split, tok, seq_len, max_rows, lazy)
        found.name = spec.name
        return found
    source = SourceConfig(name=spec.name, uri=spec.uri, format=spec.format, delimiter=spec.delimiter,
                          text_field=spec.text_field)
    rows = text_rows(tok.encode_batch(read_texts(store, cfg, source)), seq_len, tok.eos_id)[:max_rows]
    return EvalRows(spec.name, spec.uri, rows, len(rows))


def ngram_train_rows(store: ObjectStore, cfg: Config, tok: BPETokenizer, seq_len: int,
                     max_tokens: int) -> tuple[np.ndarray | None, str]:
    """Rows of the train split (in ``tok``'s tokens, at most ``max_tokens``) to fit the n-gram on; (None, why) if none."""
    try:
        found = split_rows(store, cfg, "train", tok, seq_len, max_rows=max(1, max_tokens // (seq_len + 1)),
                           every_token=True)
    except (DataError, StorageError) as err:
        return None, f"no n-gram baseline: {err}"
    rows = found.rows
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


def _speeches(store: ObjectStore, cfg: Config) -> list[tuple[str, str, bool]]:
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


def _spread(items: list, limit: int) -> list:
    """At most ``limit`` items evenly spaced over ``items`` (deterministic)."""
    if len(items) <= limit:
        return items
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def builtin_continuations(store: ObjectStore, cfg: Config, limit: int) -> list[dict[str, str]]:
    """Held-out speeches of 3+ lines: prompt = speaker line + first line, reference = the second line."""
    found = []
    for _speaker, text, held_out in _speeches(store, cfg):
        lines = text.split("\n")
        if held_out and len(lines) >= 3 and lines[2].strip():
            found.append({"prompt": f"{lines[0]}\n{lines[1]}\n", "reference": lines[2]})
    return _spread(found, limit)


def builtin_labelled(store: ObjectStore, cfg: Config, limit: int) -> list[dict[str, str]]:
    """Who speaks next: prompt = a speech and a blank line, label = the next (held-out) speech's speaker,
    one of the corpus's 4 most frequent speakers."""
    speeches = _speeches(store, cfg)
    top = {name for name, _ in Counter(s for s, _, _ in speeches).most_common(SPEAKERS)}
    found = [{"prompt": prev[1] + "\n\n", "label": cur[0] + ":"}
             for prev, cur in pairwise(speeches) if cur[2] and cur[0] in top]
    return _spread(found, limit)


def prompt_set(store: ObjectStore, cfg: Config, uri: str, kind: str, limit: int) -> list[dict[str, str]]:
    """The examples of a generation (``kind="generation"``) or labelled (``"labelled"``) set."""
    if uri == BUILTIN:
        build = builtin_continuations if kind == "generation" else builtin_labelled
        return build(store, cfg, limit)
    fields = ("prompt", "reference") if kind == "generation" else ("prompt", "label")
    return read_jsonl(store, uri, fields)[:limit]
