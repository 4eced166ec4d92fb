"""``lm chat``: an interactive chat in the terminal, streamed, with history, against a model directory (the
serving engine in this process, lm.serve.engine) or a running lmforge endpoint (the official openai client).
No Ray.

    backend = LocalChat(store, "lmforge-store/runs/x/model", cfg.generate)    # or EndpointChat(url, key)
    turns = run_chat(backend, sys.stdin, sys.stdout, interactive=sys.stdin.isatty())

Each line typed is a user turn; ``/reset`` forgets the history, ``/exit`` (or end of input) ends. The prompt
is lm.chat's template over the whole history; when it no longer fits the model's context, the oldest turns
are dropped (the system message stays), and the reply says so once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Protocol

from lm.chat import CHAT_STOPS, chat_prompt
from lm.config import GenerateConfig
from lm.storage import ObjectStore

Messages = list[dict[str, str]]


class ChatBackend(Protocol):
    def reply(self, messages: Messages) -> Iterator[str]:
        """The assistant's reply to ``messages``, in pieces as they are generated."""
        ...


class LocalChat:
    """A model directory, generating with lm.serve.engine in this process (the server's sampling)."""

    def __init__(self, store: ObjectStore, model_uri: str, gen: GenerateConfig):
        from lm.modeldir import load_model_dir
        from lm.serve.engine import Engine

        loaded = load_model_dir(store, model_uri)
        self.engine, self.tok, self.gen = (Engine(loaded.model, loaded.tokenizer, max_batch_size=1),
                                           loaded.tokenizer, gen)
        self.prompts: list[str] = []  # every prompt sent, as the model saw it

    def fit(self, messages: Messages) -> tuple[Messages, list[int]]:
        """The messages whose prompt leaves room for a reply (oldest turns dropped), and its token ids."""
        room = self.engine.context_length() - min(self.gen.max_new_tokens, self.engine.context_length() // 2)
        while True:
            ids = self.tok.encode(chat_prompt(messages))
            if len(ids) <= room or (shorter := drop_oldest_exchange(messages)) is None:
                return messages, ids[-room:]
            messages = shorter

    def reply(self, messages: Messages) -> Iterator[str]:
        from lm.serve.engine import GenRequest

        messages, ids = self.fit(messages)
        self.prompts.append(chat_prompt(messages))
        g = self.gen
        request = GenRequest(ids, min(g.max_new_tokens, self.engine.context_length() - len(ids)),
                             temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, seed=g.seed, stop=CHAT_STOPS)
        for step in self.engine.stream([request]):
            if step[0] is not None and step[0].text:
                yield step[0].text


class EndpointChat:
    """A running lmforge endpoint (``.../v1``), through the openai client's streamed chat completions."""

    def __init__(self, base_url: str, api_key: str, gen: GenerateConfig, model: str = "lmforge"):
        import openai

        self.client, self.gen, self.model = openai.OpenAI(base_url=base_url, api_key=api_key), gen, model

    def reply(self, messages: Messages) -> Iterator[str]:
        import openai

        while True:
            try:
                stream = self.client.chat.completions.create(
                    model=self.model, messages=messages, stream=True, max_tokens=self.gen.max_new_tokens,
                    temperature=self.gen.temperature, seed=self.gen.seed)
                break
            except openai.BadRequestError as err:  # too long for the context: drop the oldest exchange
                if "context length" not in str(err) or (shorter := drop_oldest_exchange(messages)) is None:
                    raise
                messages = shorter
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


def drop_oldest_exchange(messages: Messages) -> Messages | None:
    """``messages`` without their oldest user turn and the replies to it (system messages stay); None when
    only the last user turn is left."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if len(users) <= 1:
        return None
    return [m for i, m in enumerate(messages) if m["role"] == "system" or not users[0] <= i < users[1]]


def run_chat(backend: ChatBackend, inp: IO[str], out: IO[str], *, interactive: bool = False,
             system: str | None = None) -> int:
    """Read user turns from ``inp`` and stream the replies to ``out``; the number of replies."""
    base: Messages = [{"role": "system", "content": system}] if system else []
    history, replies = list(base), 0
    while True:
        if interactive:
            out.write("you> ")
            out.flush()
        line = inp.readline()
        text = line.strip()
        if not line or text == "/exit":
            return replies
        if text == "/reset":
            history = list(base)
            out.write("(history cleared)\n")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        out.write("lmforge> ")
        pieces = []
        for piece in _reply_pieces(backend, history):
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
        replies += 1


def _reply_pieces(backend: ChatBackend, history: Messages) -> Iterator[str]:
    """The reply's pieces, the leading space of the template's reply stripped."""
    started = False
    for piece in backend.reply(history):
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece

