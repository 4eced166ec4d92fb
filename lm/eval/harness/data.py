"""The data of lmforge's lm-evaluation-harness tasks, built from held-out speeches, and the task YAMLs
that read it (no download, no Ray).

The speeches are the bundled tinyshakespeare's held-out ones, the rows the rest of ``lm eval`` holds out
(lm.eval.sets.speeches: not in the run's train split). Every item fits the model's context with a token
to spare (``budget`` tokens, context and continuation together, counted as the harness counts them), so
no backend has to truncate:

* ``lmforge_cloze`` (:func:`cloze_items`): LAMBADA-style. The context is the speech's ``NAME:`` line and
  its last lines that fit, minus the last word; the target is that word (trailing punctuation dropped).
* ``lmforge_who_speaks`` (:func:`speaker_items`): the speech's first lines that fit (the shared
  continuation) after each of 4 headings ``NAME:``: the true speaker and 3 others drawn with a fixed
  seed, all among the corpus's :data:`SPEAKER_POOL` most frequent speakers.

:func:`write_tasks` writes each task's JSONL and its YAML (the packaged template, lm/eval/harness/tasks,
pointed at that JSONL) into a folder the harness's ``TaskManager(include_path=…)`` reads.

    items = cloze_items(held_out, tok, budget=63, limit=100)        # [ClozeItem]
    include_path = write_tasks(folder, {"lmforge_cloze": items})
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel

from lm.eval.likelihood import encode_pair
from lm.eval.sets import spread
from lm.tokenizer import BPETokenizer

CLOZE, WHO_SPEAKS = "lmforge_cloze", "lmforge_who_speaks"
TASKS = (CLOZE, WHO_SPEAKS)  # shipped: lm/eval/harness/tasks/<task>.yaml
SPEAKER_POOL = 20  # who_speaks: speakers (the corpus's most frequent) the items and the wrong choices come from
CHOICES = 4
_LAST_WORD = re.compile(r"(.*\S) +([A-Za-z][A-Za-z']*[A-Za-z]|[A-Za-z])[^\w\s]*\s*", re.DOTALL)


class ClozeItem(BaseModel):
    """One cloze item: the harness scores `` target`` after ``context``."""

    context: str
    target: str


class SpeakerItem(BaseModel):
    """One who-speaks item: ``line`` scored after each of ``choices`` (``"NAME:"``); ``label`` = the right one."""

    choices: list[str]
    label: int
    line: str
    speaker: str


def _tokens(tok: BPETokenizer, context: str, continuation: str) -> int:
    ctx, cont = encode_pair(tok, context, continuation)
    return len(ctx) + len(cont)


def cloze_item(tok: BPETokenizer, speech: str, budget: int) -> ClozeItem | None:
    """The cloze item of one speech (``NAME:\\n…``): as many of its last lines as fit in ``budget`` tokens;
    None when the speech does not end in a word or its last line alone does not fit."""
    header, _, body = speech.partition(":\n")
    match = _LAST_WORD.fullmatch(body)
    if not body or match is None:
        return None
    lines, word = match.group(1).split("\n"), match.group(2)
    for start in range(len(lines)):
        context = f"{header}:\n" + "\n".join(lines[start:])
        if _tokens(tok, context, " " + word) <= budget:
            return ClozeItem(context=context, target=word)
    return None


def cloze_items(held_out: Sequence[tuple[str, str]], tok: BPETokenizer, budget: int,
                limit: int) -> list[ClozeItem]:
    """Cloze items of the held-out ``(speaker, speech)`` pairs: at most ``limit``, evenly spread."""
    found = [item for _, speech in held_out if (item := cloze_item(tok, speech, budget)) is not None]
    return spread(found, limit)


def speaker_pool(speakers: Sequence[str], size: int = SPEAKER_POOL) -> list[str]:
    """The ``size`` most frequent speakers (ties: first seen first)."""
    return [name for name, _ in Counter(speakers).most_common(size)]


def speaker_line(tok: BPETokenizer, speech: str, headings: Sequence[str], budget: int) -> str | None:
    """The speech's first lines that fit in ``budget`` tokens after every one of ``headings``; None if
    not even its first line does."""
    lines = speech.partition(":\n")[2].split("\n")
    best = None
    for end in range(1, len(lines) + 1):
        line = "\n".join(lines[:end]).rstrip()
        if not line or any(_tokens(tok, h, "\n" + line) > budget for h in headings):
            break
        best = line
    return best


def speaker_items(held_out: Sequence[tuple[str, str]], pool: Sequence[str], tok: BPETokenizer, budget: int,
                  limit: int, seed: int) -> list[SpeakerItem]:
    """Who-speaks items of the held-out ``(speaker, speech)`` pairs whose speaker is in ``pool``: at most
    ``limit``, evenly spread; the wrong choices are drawn from ``pool`` with ``seed``."""
    if len(pool) < CHOICES:
        raise ValueError(f"who_speaks needs at least {CHOICES} speakers, the corpus has {len(pool)}")
    headings = [f"{name}:" for name in pool]
    found = [(speaker, line) for speaker, speech in held_out
             if speaker in pool and (line := speaker_line(tok, speech, headings, budget)) is not None]
    rng = random.Random(seed)
    items = []
    for speaker, line in spread(found, limit):
        names = [speaker, *rng.sample([n for n in pool if n != speaker], CHOICES - 1)]
        rng.shuffle(names)
        items.append(SpeakerItem(choices=[f"{n}:" for n in names], label=names.index(speaker), line=line,
                                 speaker=speaker))
    return items


def template(task: str) -> dict:
    """The packaged YAML of a shipped task (lm/eval/harness/tasks/<task>.yaml)."""
    return yaml.safe_load(resources.files("lm.eval.harness").joinpath("tasks", f"{task}.yaml").read_text())


def write_tasks(folder: Path, items: dict[str, Sequence[BaseModel]]) -> Path:
    """Write ``<task>.jsonl`` and ``<task>.yaml`` (reading it; the datasets cache inside ``folder`` too) for
    each task of ``items``; returns the folder to give ``TaskManager(include_path=…)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task, rows in items.items():
        if not rows:
            raise ValueError(f"harness task {task}: no held-out speech makes an item that fits the model's context")
        data = folder / f"{task}.jsonl"
        data.write_text("".join(row.model_dump_json() + "\n" for row in rows))
        config = template(task)
        config["dataset_kwargs"] = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")}
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
