"""Stream documents out of the configured sources (txt / jsonl, optionally gzip) in object storage.

Single-process and streaming: files are read chunk by chunk, never whole. Each document gets a
stable id ``<source>/<file>#<index>`` that the split and dedup stages key on.

    for doc in iter_documents(store, cfg.data.sources[0]):
        doc.id, doc.text
"""

from __future__ import annotations

import codecs
import fnmatch
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass

from lm.config import SourceConfig
from lm.storage import ObjectStore

_CHUNK = 1 << 16
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


def resolve_source(store: ObjectStore, uri: str) -> list[str]:
    """Expand a source URI (file, folder/prefix or glob) into a sorted list of object URIs."""
    if not any(c in uri for c in _GLOB_CHARS):
        if store.exists(uri):
            return [uri]
        found = store.list(uri)
        if not found:
            raise FileNotFoundError(f"source {uri!r} matches no objects")
        return found
    found = [u for u in store.list(_base_prefix(uri)) if fnmatch.fnmatchcase(u, uri)]
    if not found:
        raise FileNotFoundError(f"source {uri!r} matches no objects")
    return found


def _base_prefix(uri: str) -> str:
    cut = min((uri.find(c) for c in _GLOB_CHARS if c in uri), default=len(uri))
    return uri[: uri.rfind("/", 0, cut) + 1] if cut < len(uri) else uri


def _format_of(uri: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = uri[:-3] if uri.endswith(".gz") else uri
    for ext, fmt in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
        if name.endswith(ext):
            return fmt
    return "txt"


def _text_chunks(store: ObjectStore, uri: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with store.open(uri, "rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
        while chunk := stream.read(_CHUNK):
            yield decoder.decode(chunk)
    if tail := decoder.decode(b"", final=True):
        yield tail


def split_stream(chunks: Iterator[str], delimiter: str | None) -> Iterator[str]:
    """Split a stream of text chunks on ``delimiter`` (None: the whole stream is one document)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        if delimiter is None:
            continue
        *done, pending = pending.split(delimiter)
        yield from done
    yield pending


def iter_documents(store: ObjectStore, source: SourceConfig, min_chars: int = 1) -> Iterator[Document]:
    """Every non-empty document of ``source`` in a stable order."""
    uris = resolve_source(store, source.uri)
    base = _base_prefix(source.uri)
    for uri in uris:
        name = uri.rsplit("/", 1)[-1] if uri == source.uri else uri[len(base) :].lstrip("/")
        fmt = _format_of(uri, source.format)
        if fmt == "parquet":
            raise ValueError(f"{uri}: parquet sources are read by the Ray Data pipeline (lm data prepare)")
        chunks = _text_chunks(store, uri)
        texts = split_stream(chunks, "\n") if fmt == "jsonl" else split_stream(chunks, source.delimiter)
        for index, text in enumerate(texts):
            if fmt == "jsonl":
                if not text.strip():
                    continue
                text = json.loads(text).get(source.text_field, "")
            if len(text.strip()) >= min_chars:
                yield Document(id=f"{source.name}/{name}#{index}", source=source.name, text=text)
