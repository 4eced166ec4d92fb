"""Supervised fine-tuning data (``data.format: sft``): prompt / response JSONL records → chat-template
examples whose loss covers the response only. lm.data.pipeline runs these steps in place of its text
ones (same plan, dedup, split, tokenizer, manifest); no Ray import at module level.

    data: {format: sft, sources: [{name: qa, uri: s3://bucket/sft/}]}    # .jsonl or .jsonl.gz files
    lm data prepare -c configs/sft-shakespeare.yaml

Each line is a JSON object with ``data.sft.prompt_field`` and ``response_field`` (strings, not empty)
and optionally ``system_field``; it becomes ``lm.chat.sft_prompt(prompt, system)`` (no loss) followed by
``lm.chat.assistant_reply(response)`` and end-of-text (loss), tokenized with ``lm.chat.sft_tokens`` —
the text Serve's chat endpoint builds and the model then writes. Fields are Unicode-normalised and
stripped of control characters (``data.clean``) and PII-redacted (``data.pii``, lm.data.pii; counted in
the manifest's ``redacted``), nothing else: the other cleaning and quality filters are for documents. A
line that is not usable is skipped and counted by reason (:data:`RECORD_REASONS`), an unusable file by the
reasons of lm.data.sources; nothing raises.

Steps: :func:`read_records` (files → records, split by the hash of ``<source>/<file>#<line>``),
:class:`SFTTokenizeActor` (records → tokens + loss mask; records longer than a row are dropped as
``longer_than_row``, train records repeated by their source's weight), :func:`write_sft_shard` (whole
examples per row, never split across two, padded; column ``loss_mask`` beside ``tokens``). In the
manifest a split's ``tokens`` and ``bytes`` count the response (the tokens with loss and the bytes they
encode), so training's bits per byte is the response's.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lm.chat import assistant_reply, sft_example, sft_prompt
from lm.config import CleanConfig, join_uri
from lm.config.quality import PIIConfig
from lm.config.sft import SFTConfig
from lm.data.clean import normalize_unicode, remove_control_chars, text_hash, unify_newlines
from lm.data.loader import shard_bytes
from lm.data.pack import pack_examples
from lm.data.pii import redact
from lm.data.quality import COUNT_COLUMNS
from lm.data.split import split_batch
from lm.data.steps import READ_BATCH_ROWS, repeat_by_weight, write_file
from lm.tokenizer import BPETokenizer

LONGER_THAN_ROW = "longer_than_row"
# bad_json_line: not JSON; not_an_object: JSON but not {…}; missing_field: no prompt / response field (or
# null); wrong_type: a field that is not a string; empty_field: prompt or response empty or only whitespace;
# invalid_utf8: a lone surrogate escape, or not UTF-8 under data.clean.invalid_utf8 = drop;
# longer_than_row: prompt + response + end-of-text exceed a row (seq_len + 1 tokens).
RECORD_REASONS = frozenset({"bad_json_line", "not_an_object", "missing_field", "wrong_type", "empty_field",
                            "invalid_utf8", LONGER_THAN_ROW})


def _field_text(value: str, clean: CleanConfig) -> str:
    value = normalize_unicode(unify_newlines(value), clean.normalize)
    return remove_control_chars(value) if clean.remove_control_chars else value


def parse_record(line: str, sft: SFTConfig, clean: CleanConfig) -> tuple[str, str, str, str]:
    """``(prompt, reply, reason, detail)`` of one JSONL line: the chat prompt and the reply it is trained
    to write, or ``("", "", reason, detail)`` when the line cannot be used (see :data:`RECORD_REASONS`)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError) as err:
        return "", "", "bad_json_line", f"{type(err).__name__}: {err}"[:120]
    if not isinstance(record, dict):
        return "", "", "not_an_object", f"a JSON {type(record).__name__}, not an object"
    values: dict[str, str] = {}
    for key, required in ((sft.prompt_field, True), (sft.response_field, True), (sft.system_field, False)):
        value = record.get(key) if key else None
        if value is None:
            if required:
                return "", "", "missing_field", f"no field {key!r}"
            continue
        if not isinstance(value, str):
            return "", "", "wrong_type", f"field {key!r} is a {type(value).__name__}, not a string"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "", "", "invalid_utf8", f"field {key!r} holds a lone surrogate escape"
        value = _field_text(value, clean)
        if required and not value.strip():
            return "", "", "empty_field", f"field {key!r} is empty"
        values[key] = value
    system = (values.get(sft.system_field) or "").strip() if sft.system_field else ""
    prompt = sft_prompt(values[sft.prompt_field], system or sft.default_system)
    return prompt, assistant_reply(values[sft.response_field]), "", ""


def _redacted(prompt: str, reply: str, pii: PIIConfig | None) -> tuple[str, str, dict[str, int]]:
    """The record's prompt and reply redacted (``pii``: data.pii), and the counts of lm.data.quality.COUNT_COLUMNS."""
    counts = dict.fromkeys(COUNT_COLUMNS, 0)
    if pii is None or not pii.enabled:
        return prompt, reply, counts
    prompt, found = redact(prompt, pii.kinds)
    reply, more = redact(reply, pii.kinds)
    for kind, n in (found + more).items():
        counts[f"redacted_{kind}"] = n
    return prompt, reply, counts


def read_records(files: dict[str, Any], *, read: Callable, sft: SFTConfig, clean: CleanConfig,
                 split: dict[str, Any], pii: PIIConfig | None = None) -> Iterator[dict[str, list]]:
    """map_batches UDF (one fused task per file, like lm.data.steps.read_and_clean): every line of each
    file as a row ``{id, source, uri, text (prompt + reply), prompt, reply, reason, detail, n_bytes, hash,
    split}`` and the redaction counts (``pii``); ``read`` is lm.data.sources.read_file_task, which reads the
    file as lines (so a bad object is skipped and reported like any other)."""
    columns: dict[str, list] = {}
    n_files = len(next(iter(files.values()), []))
    for i in range(n_files):
        task = {**{k: v[i] for k, v in files.items()}, "format": "txt", "delimiter": "\n"}
        for row in read(task):
            prompt = reply = ""
            counts = dict.fromkeys(COUNT_COLUMNS, 0)
            if not row["reason"]:
                prompt, reply, reason, detail = parse_record(row["text"], sft, clean)
                row.update(reason=reason, detail=detail)
                if not reason:
                    prompt, reply, counts = _redacted(prompt, reply, pii)
            text = prompt + reply
            row.update(text=text, prompt=prompt, reply=reply, n_bytes=len(text.encode()),
                       hash=text_hash(text) if text else "", **counts)
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
            if len(columns["id"]) >= READ_BATCH_ROWS:
                yield split_batch(columns, **split)
                columns = {}
    if columns:
        yield split_batch(columns, **split)


def _lists(values: list[list[int]], dtype) -> Any:
    import pyarrow as pa

    lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    flat = np.fromiter((x for v in values for x in v), dtype=dtype, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class SFTTokenizeActor:
    """Holds one tokenizer per actor; turns records into examples (tokens, loss mask: lm.chat) with
    ``n_tokens`` / ``n_bytes`` of the response, ``n_all`` tokens in all and a ``reason`` (``longer_than_row``
    or ""); kept train examples repeated by their source's mixing weight."""

    def __init__(self, tokenizer_json: str, weights: dict[str, float], seq_len: int):
        self.tok = BPETokenizer.from_json(tokenizer_json)
        self.weights, self.width = weights, seq_len + 1

    def __call__(self, batch: dict[str, Any]) -> Any:
        import pyarrow as pa
        import pyarrow.compute as pc

        replies = [str(r) for r in batch["reply"]]
        examples = [sft_example(p, r, self.tok.eos_id) for p, r in zip(
            self.tok.encode_batch([str(p) for p in batch["prompt"]]), self.tok.encode_batch(replies), strict=True)]
        table = pa.table({
            "id": pa.array(batch["id"].astype(str)),
            "source": pa.array(batch["source"].astype(str)),
            "split": pa.array(batch["split"].astype(str)),
            "n_bytes": pa.array([len(r.encode()) for r in replies], type=pa.int64()),
            "n_tokens": pa.array([sum(m) for _, m in examples], type=pa.int64()),
            "n_all": pa.array([len(ids) for ids, _ in examples], type=pa.int64()),
            "tokens": _lists([ids for ids, _ in examples], np.int32),
            "mask": _lists([m for _, m in examples], np.uint8),
            "reason": pa.array([LONGER_THAN_ROW if len(ids) > self.width else "" for ids, _ in examples],
                               type=pa.string()),
        })
        kept = pc.equal(table.column("reason"), "")
        dropped = table.filter(pc.invert(kept))
        dropped = dropped.append_column("original", pa.array(np.ones(len(dropped), dtype=np.int64)))
        return pa.concat_tables([repeat_by_weight(table.filter(kept), self.weights), dropped])


def write_sft_shard(group: dict[str, Any], *, out_dir: str, fs_factory, seq_len: int, pad_id: int) -> dict[str, Any]:
    """Pack one (split, bucket) group of examples (in id order) into padded rows of seq_len + 1 with their
    loss masks (lm.data.pack.pack_examples with ``pad_id``) and write it as one Parquet file."""
    order = np.argsort(np.asarray(group["id"], dtype=object).astype(str))
    split, bucket = str(group["split"][0]), int(group["bucket"][0])
    rows, mask, _ = pack_examples(((group["tokens"][i], group["mask"][i]) for i in order), seq_len, pad_id=pad_id)
    data = shard_bytes(rows, mask)
    name = f"{split}-{bucket:05d}.parquet"
    write_file(fs_factory, join_uri(out_dir, name), data)
    return {
        "path": [name], "split": [split], "rows": [len(rows)], "tokens": [int(rows.size)], "dropped_tail_tokens": [0],
        "docs": [len(order)], "loss_tokens": [int(mask.sum())], "sha256": [hashlib.sha256(data).hexdigest()],
    }


def manifest_entry(sft: SFTConfig) -> dict[str, Any]:
    """What the manifest records about the supervised format (``manifest["sft"]``)."""
    return {**sft.model_dump(mode="json"), "template": "plain",
            "counts": "splits' tokens and bytes: the response's (with end-of-text), the tokens with loss"}
