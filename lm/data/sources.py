"""Configured sources → file tasks → document rows, robustly: the read stage of the Ray Data pipeline.

Owns (no Ray import): :func:`plan_files`, on the driver, expands each source URI (file, folder/prefix, or
glob where ``*``/``?`` stay in one path segment and ``**`` crosses them) into sorted picklable file tasks,
skipping hidden/temp names (a path part starting with ``.`` or ``_``). :func:`read_file_task`, on a
worker, streams one file through a pyarrow filesystem (gzip/zstd decoded on the fly; only one document is
ever whole in memory) into rows ``{id, source, uri, text, reason, detail}``, ids ``<source>/<path relative
to the source's base prefix>#<piece/line/row index>`` (independent of the storage root). Bad input never
raises: an unusable object yields ONE row (id ``<source>/<path>``, text "", a reason in
:data:`OBJECT_REASONS`); a bad document yields its row with text "" and a reason in
:data:`DOCUMENT_REASONS`. Corruption or a read error found mid-stream keeps the documents already yielded
(they decoded fine) and appends the object row.
"""
from __future__ import annotations

import gzip
import itertools
import json
import posixpath
import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lm.config import CleanConfig, DataConfig, SourceConfig
from lm.data.clean import decode_utf8
from lm.storage import ObjectStore, StorageError
from lm.storage.uri import parse_uri

__all__ = ["DOCUMENT_REASONS", "OBJECT_REASONS", "DataError", "check_every_source_read", "plan_files",
           "read_file_task"]

# corrupt_compression: truncated/invalid gzip or zstd; binary: NUL bytes in the first 8 KiB, or (invalid_utf8
# = drop) mostly not UTF-8 there; empty: 0 bytes / only whitespace / no parquet rows; too_large: stored size >
# max_file_bytes; unreadable: missing, denied, I/O error, not Parquet; bad_json: no parseable jsonl line;
# missing_column: parquet without the text column (or it is not text).
OBJECT_REASONS = frozenset({"corrupt_compression", "binary", "empty", "too_large", "unreadable", "bad_json",
                            "missing_column"})
# invalid_utf8 (policy drop), missing_field (no string text field / null row), bad_json_line.
DOCUMENT_REASONS = frozenset({"invalid_utf8", "missing_field", "bad_json_line"})

_GLOB_CHARS = "*?["
_SNIFF = 8192
_BINARY_FRACTION = 0.1  # share of invalid UTF-8 bytes in the first 8 KiB that makes "binary" under drop
_MAX_PENDING_BAD_LINES = 10_000  # jsonl: this many bad lines before any good one → the file is bad_json
_BOM = b"\xef\xbb\xbf"
_SECRETISH = re.compile(r"(?i)((?:secret|password|token|signature|credential|access.?key)[\w-]*\s*[=:]\s*)\S+")
_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")


class DataError(ValueError):
    """A data source that cannot be used (e.g. its URI matches no files); the message names it."""


def plan_files(store: ObjectStore, data: DataConfig) -> list[dict[str, Any]]:
    """One task dict per file of every source (sources in config order, files sorted by URI).

    Keys: uri, name (path relative to the source's base prefix, used in ids), source, format
    (txt/jsonl/parquet), compression (gzip/zstd/""), delimiter, text_field, size (bytes, -1 = unknown).
    """
    tasks = []
    for src in data.sources:
        files = _expand(store, src)
        for (uri, name), size in zip(files, _sizes(store, src.uri, files), strict=True):
            # delimiter "" = one document per file: never None, which a Ray Data column turns into NaN
            tasks.append({"uri": uri, "name": name, "source": src.name, "format": _format_of(uri, src.format),
                          "compression": _compression_of(uri), "delimiter": src.delimiter or "",
                          "text_field": src.text_field, "size": size})
    return tasks


def _expand(store: ObjectStore, source: SourceConfig) -> list[tuple[str, str]]:
    """(uri, relative name) of the files a source names; StorageError propagates (it names the URI)."""
    uri = source.uri
    if not any(c in uri for c in _GLOB_CHARS) and store.exists(uri):
        return [(uri, uri.rstrip("/").rsplit("/", 1)[-1])]
    base = _base_prefix(uri) or "./"
    named = [(u, u[len(base) :].lstrip("/")) for u in store.list(base)]
    if any(c in uri for c in _GLOB_CHARS):
        pattern = _glob_regex(uri[len(_base_prefix(uri)) :])
        named = [(u, n) for u, n in named if pattern.fullmatch(n)]
    visible = [(u, n) for u, n in named if not any(p[:1] in (".", "_") for p in n.split("/"))]
    if not visible:
        hidden = f" ({len(named)} hidden/temp files skipped)" if named else ""
        raise DataError(f"data source {source.name!r}: {uri!r} matches no files{hidden}")
    return sorted(visible)


def _base_prefix(uri: str) -> str:
    """The folder part before the first glob character (the URI itself when it has none)."""
    cut = min((uri.find(c) for c in _GLOB_CHARS if c in uri), default=len(uri))
    return uri[: uri.rfind("/", 0, cut) + 1] if cut < len(uri) else uri


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*``/``?`` match within one path segment, ``**`` any depth (``a/**/b`` also matches ``a/b``)."""
    out, i = [], 0
    while i < len(pattern):
        for token, regex in (("**/", "(?:.*/)?"), ("**", ".*"), ("*", "[^/]*"), ("?", "[^/]")):
            if pattern.startswith(token, i):
                out.append(regex)
                i += len(token)
                break
        else:
            end = pattern.find("]", i + 2) if pattern[i] == "[" else -1
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append(re.escape(pattern[i]) if end < 0 else "[" + ("^" + body[1:] if body[0] == "!" else body) + "]")
            i = i + 1 if end < 0 else end + 1
    return re.compile("".join(out))


def _compression_of(uri: str) -> str:
    if uri.startswith("bundled://") or uri.endswith(".gz"):
        return "gzip"  # bundled://NAME is read through its lm/corpora/NAME.txt.gz (or .jsonl.gz) file
    return "zstd" if uri.endswith((".zst", ".zstd")) else ""


def _format_of(uri: str, declared: str) -> str:
    if uri.startswith("bundled://"):  # bundled://NAME: by the file behind it (NAME.txt.gz or NAME.jsonl.gz)
        uri = parse_uri(uri).path.name
    ext = posixpath.splitext(re.sub(r"\.(gz|zst|zstd)$", "", uri))[1]
    by_ext = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(ext, "txt")
    return by_ext if declared == "auto" else declared


def _sizes(store: ObjectStore, uri: str, files: list[tuple[str, str]]) -> list[int]:
    """Bytes per file: a stat locally; on S3 one HEAD or one pyarrow listing (best effort: else -1)."""
    if store.local_path(files[0][0]) is not None:
        return [p.stat().st_size if (p := store.local_path(u)) and p.is_file() else -1 for u, _ in files]
    try:
        if files == [(uri, files[0][1])]:  # the source names one object
            fs, path = store.pyarrow_filesystem(uri)
            return [size if (size := fs.get_file_info(path).size) is not None else -1]
        fs, base = store.pyarrow_filesystem(_base_prefix(uri))
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        found = {i.path: i.size for i in infos if i.size is not None}
        return [found.get(f"{base}/{name}", -1) for _, name in files]
    except Exception:  # sizes are an optimisation; read_file_task asks again on the worker
        return [-1] * len(files)


def _row(task: dict[str, Any], id_: str, text: str = "", reason: str = "", detail: str = "") -> dict[str, str]:
    return {"id": id_, "source": task["source"], "uri": task["uri"], "text": text, "reason": reason,
            "detail": detail}


def _safe(err: BaseException, typed: bool = True) -> str:
    """A short, single-line error text with anything credential-like masked."""
    text = " ".join((f"{type(err).__name__}: {err}" if typed else str(err)).split())
    return _KEY_ID.sub("***", _SECRETISH.sub(r"\1***", text))[:300]


def check_every_source_read(files: list[dict[str, Any]], reasons: list[dict[str, Any]],
                            skipped: list[dict[str, str]]) -> None:
    """Raise :class:`DataError` for the first source (sorted) whose planned ``files`` gave no document,
    naming it and why, even when other sources gave some. ``reasons``: document counts per (source,
    reason), "" for kept ones (``count()``); ``skipped``: one {source, uri, reason, detail} per object."""
    found = {r["source"] for r in reasons if r["reason"] == "" and r["count()"]}
    for source in sorted({f["source"] for f in files} - found):
        mine = [s for s in skipped if s["source"] == source]
        dropped = dict(sorted((r["reason"], r["count()"]) for r in reasons if r["source"] == source and r["reason"]))
        first = f"; the first: {mine[0]['uri']}: {mine[0]['reason']} ({mine[0]['detail']})" if mine else ""
        raise DataError(f"source {source!r}: no document in its {sum(f['source'] == source for f in files)} files "
                        f"({len(mine)} objects skipped: {dict(sorted(Counter(s['reason'] for s in mine).items()))}; "
                        f"documents dropped: {dropped}{first})")


def read_file_task(task: dict[str, Any], *, filesystem_factory: Callable[[str], tuple[Any, str]],
                   clean: CleanConfig, max_file_bytes: int, chunk_size: int = 1 << 20) -> Iterator[dict[str, str]]:
    """Yield the document rows of one planned file (see the module doc); never raises on bad input. Only
    the object's own faults (I/O, storage, decompression, decoding, format: :data:`_OBJECT_ERRORS`) make it
    a skipped object; any other exception is a bug and propagates, failing the run with its traceback."""
    obj_id = f"{task['source']}/{task['name']}"
    try:
        yield from _read(task, obj_id, filesystem_factory, clean, max_file_bytes, chunk_size)
    except (EOFError, zlib.error, gzip.BadGzipFile, _ZstdCorrupt) as err:
        detail = f"{task['compression']}: {_safe(err, typed=False)}"
        yield _row(task, obj_id, reason="corrupt_compression", detail=detail)
    except _OBJECT_ERRORS as err:
        yield _row(task, obj_id, reason="unreadable", detail=_safe(err))


def _read(task: dict[str, Any], obj_id: str, factory: Callable[[str], tuple[Any, str]], clean: CleanConfig,
          max_file_bytes: int, chunk_size: int) -> Iterator[dict[str, str]]:
    fs, path = factory(task["uri"])
    size = task.get("size", -1)
    if size is None or size < 0:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{task['uri']}: no such file or object")
        size = info.size if info.size is not None else -1
    if size > max_file_bytes:
        yield _row(task, obj_id, reason="too_large", detail=f"{size} bytes > max {max_file_bytes}")
    elif size == 0:
        yield _row(task, obj_id, reason="empty", detail="0 bytes")
    elif task["format"] == "parquet":
        yield from _parquet_rows(task, obj_id, fs, path, clean.invalid_utf8)
    else:
        chunks = _chunks(fs, path, task["compression"], chunk_size)
        head_parts: list[bytes] = []
        seen = 0
        while seen < _SNIFF and (chunk := next(chunks, None)) is not None:  # chunk boundaries kept
            head_parts.append(chunk)
            seen += len(chunk)
        if why := _binary(b"".join(head_parts)[:_SNIFF], clean.invalid_utf8):
            chunks.close()
            yield _row(task, obj_id, reason="binary", detail=why)
            return
        chunks = itertools.chain(head_parts, chunks)
        if task["format"] == "jsonl":
            yield from _jsonl_rows(task, obj_id, _split(chunks, b"\n"), clean.invalid_utf8)
        else:
            delimiter = task["delimiter"].encode() if task["delimiter"] else None
            yield from _txt_rows(task, obj_id, _split(chunks, delimiter), clean.invalid_utf8)


def _binary(head: bytes, policy: str) -> str:
    if b"\x00" in head:
        return "NUL bytes in the first 8 KiB"
    invalid = len(head) - len(head.decode("utf-8", errors="ignore").encode())
    if policy == "drop" and invalid > _BINARY_FRACTION * len(head):
        return f"{invalid} of the first {len(head)} bytes are not UTF-8"
    return ""


class _ZstdCorrupt(ValueError):
    pass


class _FormatError(ValueError):
    """The object is not in a format it can be read as (e.g. gzip-compressed Parquet)."""


# what an unreadable object raises: OS / network / filesystem (OSError, pyarrow's S3 errors), the storage
# layer, pyarrow's format errors (not Parquet), text decoding
_OBJECT_ERRORS = (OSError, StorageError, pa.ArrowException, UnicodeError, _FormatError)


def _chunks(fs: Any, path: str, compression: str, chunk_size: int) -> Iterator[bytes]:
    """The file's (decompressed) bytes in pieces of about ``chunk_size``, streamed."""
    with fs.open_input_stream(path, compression=None) as raw:  # we decompress ourselves
        if compression == "gzip":
            stream = gzip.GzipFile(fileobj=raw, mode="rb")
            while chunk := stream.read(chunk_size):
                yield chunk
        elif compression == "zstd":
            yield from _unzstd(raw, chunk_size)
        else:
            while chunk := raw.read(chunk_size):
                yield chunk


def _unzstd(raw: Any, chunk_size: int) -> Iterator[bytes]:
    """zstd, frame by frame: unlike ``stream_reader`` this notices a stream truncated mid-frame."""
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    frame, fed = dctx.decompressobj(), False
    while data := raw.read(min(chunk_size, 1 << 16)):  # bounded input per call bounds the output
        while data:
            try:
                out = frame.decompress(data)
            except zstandard.ZstdError as err:
                raise _ZstdCorrupt(str(err)) from None
            if out:
                yield out
            fed, data = True, b""
            if frame.eof:
                data, frame, fed = frame.unused_data, dctx.decompressobj(), False
    if fed and not frame.eof:
        raise _ZstdCorrupt("stream ends in the middle of a frame (truncated)")


def _split(chunks: Iterator[bytes], delimiter: bytes | None) -> Iterator[bytes]:
    """Split a byte stream on ``delimiter`` (None: one piece), linear time, one piece in memory."""
    buf, scan = bytearray(), 0
    for chunk in chunks:
        buf += chunk
        if not delimiter:
            continue
        start = 0
        while (hit := buf.find(delimiter, scan)) >= 0:
            yield bytes(buf[start:hit])
            start = scan = hit + len(delimiter)
        del buf[:start]
        scan = max(0, len(buf) - len(delimiter) + 1)  # a delimiter may straddle the next chunk
    yield bytes(buf)


def _txt_rows(task: dict[str, Any], obj_id: str, pieces: Iterator[bytes], policy: str) -> Iterator[dict[str, str]]:
    any_row = False
    for index, piece in enumerate(pieces):
        piece = piece.removeprefix(_BOM) if index == 0 else piece
        if not piece or piece.isspace():  # e.g. after a trailing delimiter: not a document
            continue
        any_row = True
        text = decode_utf8(piece, policy)
        if text is None:
            yield _row(task, f"{obj_id}#{index}", reason="invalid_utf8", detail="document is not valid UTF-8")
        else:
            yield _row(task, f"{obj_id}#{index}", text)
    if not any_row:
        yield _row(task, obj_id, reason="empty", detail="only whitespace")


def _jsonl_rows(task: dict[str, Any], obj_id: str, lines: Iterator[bytes], policy: str) -> Iterator[dict[str, str]]:
    """Bad lines wait for a good one: a file of only bad lines (or 10k before any good one) is one bad_json row."""
    pending: list[dict[str, str]] = []
    good = False
    for index, line in enumerate(lines):
        line = line.removeprefix(_BOM) if index == 0 else line
        if not line or line.isspace():
            continue
        row = _json_row(task, f"{obj_id}#{index}", line, index + 1, policy)
        if good or row["reason"] != "bad_json_line":
            yield from pending
            pending, good = [], True
            yield row
        elif len(pending) < _MAX_PENDING_BAD_LINES:
            pending.append(row)
        else:
            yield _row(task, obj_id, reason="bad_json",
                       detail=f"first {len(pending)} lines are not JSON: {pending[0]['detail']}")
            return
    if not good:
        detail = f"no line is JSON: {pending[0]['detail']}" if pending else "only whitespace"
        yield _row(task, obj_id, reason="bad_json" if pending else "empty", detail=detail)


def _json_row(task: dict[str, Any], id_: str, line: bytes, lineno: int, policy: str) -> dict[str, str]:
    raw = decode_utf8(line, policy)
    if raw is None:
        return _row(task, id_, reason="invalid_utf8", detail=f"line {lineno} is not valid UTF-8")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as err:
        return _row(task, id_, reason="bad_json_line", detail=f"line {lineno}: {_safe(err)[:120]}")
    field = task["text_field"]
    value = obj.get(field) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        what = "not a JSON object" if not isinstance(obj, dict) else f"no string field {field!r}"
        return _row(task, id_, reason="missing_field", detail=f"line {lineno}: {what}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\\ud800" escape: Arrow cannot store it
        if (value := decode_utf8(value.encode("utf-8", errors="surrogatepass"), policy)) is None:
            return _row(task, id_, reason="invalid_utf8", detail=f"line {lineno}: lone surrogate escape")
    return _row(task, id_, value)


def _parquet_rows(task: dict[str, Any], obj_id: str, fs: Any, path: str, policy: str) -> Iterator[dict[str, str]]:
    if task["compression"]:
        raise _FormatError(f"{task['compression']}-compressed Parquet is not supported (it compresses inside)")
    field = task["text_field"]
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        if (col := schema.get_field_index(field)) < 0:
            yield _row(task, obj_id, reason="missing_column", detail=f"no column {field!r}: {schema.names[:10]}")
            return
        kind = str(schema.field(col).type)
        is_bin = kind in ("binary", "large_binary", "binary_view")
        if not is_bin and kind not in ("string", "large_string", "string_view"):
            yield _row(task, obj_id, reason="missing_column", detail=f"column {field!r} is {kind}, not text")
            return
        if pf.metadata.num_rows == 0:
            yield _row(task, obj_id, reason="empty", detail="no rows")
        batches = pf.iter_batches(batch_size=1024, columns=[field])
        values = (value for batch in batches for value in batch.column(0).to_pylist())
        for index, value in enumerate(values):
            text = decode_utf8(value, policy) if is_bin and value is not None else value
            if value is None:
                yield _row(task, f"{obj_id}#{index}", reason="missing_field", detail=f"row {index}: null {field!r}")
            elif text is None:
                yield _row(task, f"{obj_id}#{index}", reason="invalid_utf8", detail=f"row {index}: not UTF-8")
            else:
                yield _row(task, f"{obj_id}#{index}", text)
