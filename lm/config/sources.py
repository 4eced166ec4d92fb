"""A data source: where documents are read from and how (data.sources, continual.corpus, eval sets)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lm.config.base import PATH, Section


class SourceConfig(Section):
    """One text source: a file, folder or glob of .txt / .jsonl / .parquet files (optionally .gz / .zst)."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Short name used in manifests and reports.")
    uri: Annotated[str, PATH] = Field(
        ...,
        description="File, folder or glob: a local path, file://, s3://bucket/prefix, or bundled://NAME "
        "for a corpus shipped inside lmforge (bundled://tinyshakespeare).",
    )
    format: Literal["auto", "txt", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto picks by extension (.txt/.jsonl/.parquet, optionally .gz or .zst)."
    )
    delimiter: str | None = Field(
        "\n\n", description="For txt: split each file into documents on this string; null = one document per file."
    )
    text_field: str = Field("text", description="For jsonl / parquet: the field or column holding the text.")
    weight: float = Field(
        1.0, gt=0, description="Mixing weight: each train document is used this many times on average "
        "(2 doubles the source, 0.25 keeps a stable quarter); validation and test are not re-weighted.",
    )
    split: Literal["train", "val", "test"] | None = Field(
        None, description="Put every document of this source in one split (e.g. a fixed held-out set); "
        "null = the hash split of data.val_fraction / test_fraction.",
    )
