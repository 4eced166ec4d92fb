"""Generated text as people read it: document boundaries shown as a separator line, not as the raw
end-of-text token.

A model that keeps generating past end-of-text (``generate.ignore_eos``, as the demo does to show a few
speeches) writes ``<|endoftext|>`` between documents. Wherever lmforge prints a sample for people (the
demo, ``lm generate``, ``lm serve --ask``, the evaluation report's Markdown) it goes through
:func:`show_documents`; the model's output itself (API responses, ``samples.json``, ``report.json``,
stored generations) keeps the token.

    print(show_documents("ROMEO:\\nO, she doth teach!<|endoftext|>JULIET:\\nAy me!"))
"""

from __future__ import annotations

EOS_TOKEN = "<|endoftext|>"  # tokenizer.eos_token's default
SEPARATOR = "───"


def show_documents(text: str, eos_token: str = EOS_TOKEN) -> str:
    """``text`` with every ``eos_token`` replaced by a blank line, a ``───`` line and a blank line (the
    newlines around each boundary folded into them; at either end of the text, the ``───`` line alone)."""
    if not eos_token or eos_token not in text:
        return text
    first, *rest = text.split(eos_token)
    shown = first.rstrip("\n")
    for part in rest:
        shown += f"\n\n{SEPARATOR}" if shown else SEPARATOR
        if part := part.strip("\n"):
            shown += f"\n\n{part}"
    return shown
