"""The chat template and supervised examples: how messages become the text a model continues, and how a
(prompt, response) pair becomes training tokens. The one place serving (lm.serve.schemas), supervised
fine-tuning (lm.data.sft, ``data.format: sft``) and continual learning (lm.continual.feedback) take
them from, so a model is trained on exactly the text it is later served. Pure: no Ray, no torch.

Template ``plain``: each message becomes ``System: …`` / ``User: …`` / ``Assistant: …``, turns are
separated by a blank line, and the prompt ends with ``Assistant:``; the model's reply follows after one
space, and generation stops at the next ``\\n\\nUser:`` or ``\\n\\nSystem:`` (:data:`CHAT_STOPS`) or at
end-of-text.

    prompt = chat_prompt([{"role": "user", "content": "Hi"}])      # 'User: Hi\\n\\nAssistant:'
    prompt = sft_prompt("Hi", system="Be brief.")                  # 'System: Be brief.\\n\\nUser: Hi\\n\\nAssistant:'
    ids, mask = sft_tokens(tokenizer, prompt, assistant_reply("Hello."))   # mask: 1 on ' Hello.' + end-of-text
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

ROLES = ("system", "user", "assistant")
CHAT_STOPS = ["\n\nUser:", "\n\nSystem:"]
REPLY_PREFIX = " "  # between "Assistant:" and the reply


class Tokenizer(Protocol):
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


def _role_content(message: Any) -> tuple[str, str]:
    """(role, content) of a message given as a mapping or an object with ``role`` / ``content``."""
    role, content = ((message.get("role"), message.get("content")) if isinstance(message, Mapping)
                     else (getattr(message, "role", None), getattr(message, "content", None)))
    if role not in ROLES:
        raise ValueError(f"chat message role must be one of {list(ROLES)}, got {role!r}")
    if not isinstance(content, str):
        raise ValueError(f"chat message content must be a string, got {type(content).__name__}")
    return role, content


def chat_prompt(messages: Iterable[Any]) -> str:
    """The ``plain`` template (see the module docstring): the text whose continuation is the reply."""
    turns = [f"{role.capitalize()}: {content}" for role, content in map(_role_content, messages)]
    return "\n\n".join([*turns, "Assistant:"])


def sft_prompt(prompt: str, system: str | None = None) -> str:
    """The chat prompt of one supervised record: an optional system message, then the user's prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return chat_prompt([*messages, {"role": "user", "content": prompt}])


def assistant_reply(content: str) -> str:
    """The reply as the model writes it after ``Assistant:`` (one space, then the stripped content; the
    chat API returns it stripped)."""
    return REPLY_PREFIX + content.strip()


def sft_example(prompt_ids: Sequence[int], reply_ids: Sequence[int], eos_id: int) -> tuple[list[int], list[int]]:
    """A supervised example: prompt, reply and end-of-text, with a loss mask that is 1 on the reply and
    the end-of-text (what the model is taught to write, and to stop) and 0 on the prompt."""
    reply = [*reply_ids, eos_id]
    return [*prompt_ids, *reply], [0] * len(prompt_ids) + [1] * len(reply)


def sft_tokens(tokenizer: Tokenizer, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """:func:`sft_example` of texts: the prompt and the reply are encoded separately, as serving encodes
    the prompt alone and the model then writes the reply."""
    return sft_example(tokenizer.encode(prompt), tokenizer.encode(reply), tokenizer.eos_id)
