"""The bundled supervised fine-tuning set ``bundled://sft-shakespeare`` (lm/corpora/sft-shakespeare.jsonl.gz),
made deterministically from the bundled tinyshakespeare so the SFT preset runs offline. Pure: no Ray.

    python -m lm.data.sft_shakespeare        # rewrites lm/corpora/sft-shakespeare.jsonl.gz (same bytes every time)

Two kinds of records, in corpus order (prompt / response, the format of ``data.format: sft``):

* who speaks: ``"Who speaks these lines?\\n<1 to 3 lines>"`` → ``"<SPEAKER>"`` for every other speech of
  the corpus's 40 most frequent speakers;
* continue: ``"Continue <SPEAKER>'s speech:\\n<first line>"`` → ``"<the next two lines>"`` for every
  speech of three lines or more, with the system message ``"You are an actor in a Shakespeare play."``.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

from lm.storage.uri import CORPORA

OUTPUT = CORPORA / "sft-shakespeare.jsonl.gz"
SPEAKERS = 40
SYSTEM = "You are an actor in a Shakespeare play."


def speeches(plays: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech (``SPEAKER:\\nline\\n…``, speeches separated by a blank line)."""
    out = []
    for block in plays.split("\n\n"):
        head, sep, body = block.strip("\n").partition(":\n")
        lines = [line for line in body.split("\n") if line.strip()]
        if sep and head and "\n" not in head and lines:
            out.append((head, lines))
    return out


def records(plays: str) -> list[dict[str, str]]:
    """The records of the set (see the module docstring), deterministic for the same text."""
    found = speeches(plays)
    top = {name for name, _ in Counter(s for s, _ in found).most_common(SPEAKERS)}
    out: list[dict[str, str]] = []
    for i, (speaker, lines) in enumerate(found):
        if speaker in top and len(lines) <= 3 and i % 2 == 0:
            out.append({"prompt": "Who speaks these lines?\n" + "\n".join(lines), "response": speaker})
        if len(lines) >= 3:
            out.append({"system": SYSTEM, "prompt": f"Continue {speaker}'s speech:\n{lines[0]}",
                        "response": "\n".join(lines[1:3])})
    return out


def jsonl_gz(items: list[dict[str, str]]) -> bytes:
    """JSON lines, gzip-compressed with no timestamp or name in the header (the same bytes every time)."""
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in items)
    return gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)


def build(corpus: Path = CORPORA / "tinyshakespeare.txt.gz", output: Path = OUTPUT) -> int:
    """Write the set from ``corpus`` to ``output``; returns the number of records."""
    items = records(gzip.decompress(corpus.read_bytes()).decode("utf-8"))
    output.write_bytes(jsonl_gz(items))
    return len(items)


if __name__ == "__main__":
    print(f"{build()} records → {OUTPUT}")
