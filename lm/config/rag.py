"""The ``rag`` section: the passage index that retrieval-augmented generation reads (lm.rag), and how
retrieved passages go into a prompt.

    rag:
      sources: [{name: plays, uri: bundled://tinyshakespeare}]   # what `lm rag build` indexes
      passage_words: 80
      top_k: 3
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, field_validator, model_validator

from lm.config.base import PATH, Section
from lm.config.sources import SourceConfig

DEFAULT_RAG_TEMPLATE = "Context:\n{context}\n\n{prompt}"


class RagConfig(Section):
    """Retrieval-augmented generation: a BM25 index of passages (lm.rag) built by ``lm rag build``."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="Text sources to index (as data.sources: txt / jsonl / parquet, local or s3://)."
    )
    index: Annotated[str | None, PATH] = Field(
        None, description="Where the index lives; null = <storage.root>/rag/index.")
    passage_words: int = Field(80, ge=8, description="Words per passage (documents are cut into overlapping windows).")
    overlap_words: int = Field(16, ge=0, description="Words shared by consecutive passages of a document.")
    top_k: int = Field(3, ge=1, le=20, description="Passages put into a prompt unless the request says otherwise.")
    max_top_k: int = Field(10, ge=1, le=50, description="Largest top_k a request may ask for.")
    template: str = Field(
        DEFAULT_RAG_TEMPLATE, description="How passages join the prompt: {context} (numbered passages, one per line "
        "block, as many as fit the model's context) and {prompt} (the request's prompt or last user message).",
    )

    @field_validator("template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        from string import Formatter

        fields = {f for _, f, _, _ in Formatter().parse(value) if f is not None}
        if fields != {"context", "prompt"}:
            raise ValueError(f"must use exactly the fields {{context}} and {{prompt}}, found {sorted(fields)}")
        return value

    @model_validator(mode="after")
    def _check_overlap(self) -> RagConfig:
        if self.overlap_words >= self.passage_words:
            raise ValueError(f"overlap_words ({self.overlap_words}) must be below passage_words ({self.passage_words})")
        if self.top_k > self.max_top_k:
            raise ValueError(f"top_k ({self.top_k}) exceeds max_top_k ({self.max_top_k})")
        return self
