"""Single-process document streaming: the same reading, cleaning and quality stack as the Ray Data pipeline,
without Ray, deduplication or decontamination, for quick tools (``lm tokenizer train``) and tests.

    for doc in iter_documents(store, cfg.data, split="train"):
        doc.id, doc.source, doc.text
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from lm.config import DataConfig
from lm.data.clean import clean_text
from lm.data.quality import apply_stack
from lm.data.sources import plan_files, read_file_task
from lm.data.split import assign_split
from lm.storage import ObjectStore


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


def iter_documents(store: ObjectStore, data: DataConfig, split: str | None = None) -> Iterator[Document]:
    """Every kept (read + cleaned) document of every source, optionally only those of ``split``."""
    for task in plan_files(store, data):
        rows = read_file_task(task, filesystem_factory=store.pyarrow_filesystem, clean=data.clean,
                              max_file_bytes=int(data.max_file_mb * 2**20))
        for row in rows:
            if row["reason"]:
                continue
            text, reason = clean_text(row["text"], data.clean)
            if not reason:
                text, reason, _ = apply_stack(text, data)
            if reason:
                continue
            if split is None or assign_split(row["id"], data.val_fraction, data.test_fraction) == split:
                yield Document(row["id"], row["source"], text)
