"""`lm chat` against a model directory: each line a turn, the reply streamed, the history in the next prompt,
/reset forgets it, and a conversation longer than the context drops its oldest turns."""

import io

from lm.chat import CHAT_STOPS
from lm.chat_terminal import LocalChat, run_chat
from lm.config import GenerateConfig
from lm.modeldir import save_model_dir
from lm.serve.engine import GenRequest
from lm.storage import ObjectStore


def test_chat_keeps_history_streams_greedy_replies_and_fits_the_context(tmp_path, small_tokenizer, small_model):
    store = ObjectStore()
    model_dir = str(tmp_path / "model")
    save_model_dir(store, model_dir, small_model(small_tokenizer, max_seq_len=128), small_tokenizer,
                   GenerateConfig(), {})
    chat = LocalChat(store, model_dir, GenerateConfig(temperature=0, max_new_tokens=6))
    out = io.StringIO()
    replies = run_chat(chat, io.StringIO("Hello there\nAnd again?\n/reset\nHi\n"), out, system="Be brief.")
    assert replies == 3 and out.getvalue().count("lmforge> ") == 3 and "(history cleared)" in out.getvalue()
    first, second, third = chat.prompts
    assert first == "System: Be brief.\n\nUser: Hello there\n\nAssistant:"
    parts = out.getvalue().replace("(history cleared)\n", "").split("lmforge> ")[1:]
    shown = [part.removesuffix("\n") for part in parts]  # each reply as printed (newlines and all)
    assert second.startswith(f"{first} {shown[0]}\n\nUser: And again?") and second.endswith("Assistant:")
    assert third == "System: Be brief.\n\nUser: Hi\n\nAssistant:"  # after /reset
    for prompt, reply in zip(chat.prompts, shown, strict=True):  # what the engine gives greedily, stripped
        ids = small_tokenizer.encode(prompt)
        whole = chat.engine.generate([GenRequest(ids, 6, temperature=0, seed=0, stop=CHAT_STOPS)])[0]
        assert whole.text.strip() == reply
    long = "".join(f"turn {i} with rather many words in it, and then some more words again\n" for i in range(6))
    run_chat(chat, io.StringIO(long), io.StringIO())
    last = chat.prompts[-1]
    assert last.startswith("User: turn ")  # whole exchanges dropped, never a reply without its question
    assert "User: turn 5" in last and "User: turn 0" not in last  # the oldest dropped to fit 128 tokens
    assert len(small_tokenizer.encode(last)) <= 128 - 6
