"""The ``data.sft`` section: how prompt / response JSONL records become supervised examples when
``data.format: sft`` (lm.data.sft renders them with the chat template of lm.chat).

    data:
      format: sft
      sources: [{name: qa, uri: s3://bucket/sft/}]     # *.jsonl / *.jsonl.gz: {"prompt": …, "response": …}
      sft: {prompt_field: question, response_field: answer}
"""

from __future__ import annotations

from pydantic import Field, model_validator

from lm.config.base import Section


class SFTConfig(Section):
    """Supervised records (``data.format: sft``): JSON objects with a prompt, a response and optionally a
    system message; each becomes the chat prompt (no loss) followed by the reply and end-of-text (loss)."""

    prompt_field: str = Field("prompt", min_length=1, description="The field holding the user's prompt (a string).")
    response_field: str = Field(
        "response", min_length=1, description="The field holding the answer the model should learn (a string)."
    )
    system_field: str | None = Field(
        "system", description="An optional field holding a system message (a string; absent, null or empty: none); "
        "null = never read one.",
    )
    default_system: str | None = Field(
        None, description="System message for records without one; null = none (the prompt starts at 'User:').",
    )

    @model_validator(mode="after")
    def _check_fields(self) -> SFTConfig:
        named = [f for f in (self.prompt_field, self.response_field, self.system_field) if f]
        if len(set(named)) != len(named):
            raise ValueError(f"prompt_field, response_field and system_field must differ, got {named}")
        return self
