"""The docs stay true: docs/configuration.md is what `lm config docs` generates from the schema now, and
every `lm …` command line shown in README.md and docs/*.md parses with the CLI's own parser and names
only config keys (and --config files) that exist."""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from lm.cli import build_parser, parse_args
from lm.config import Config, ConfigError, load_config, parse_override
from lm.config.docs import DOCS_PATH, render_markdown

ROOT = Path(__file__).parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# --config files a command line names that a run writes (not shipped in the repo)
WRITTEN_BY_RUNS = {"best.yaml"}  # `lm tune` writes <run>/tune/best.yaml
COMMAND = re.compile(r"^(?:\$\s+)?(?:\S*/)?lm\s+\S")
SYNOPSIS = re.compile(r"[\[\]|…]|\.\.\.")
FENCE = re.compile(r"^\s*(```|~~~)")
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "png", "txt", "gz", "safetensors", "parquet"}


# --- finding command lines ------------------------------------------------------------------------------

def fenced_and_prose(text: str) -> tuple[list[tuple[int, str]], str]:
    """(line number, line) of every line inside code fences, and the text with those lines blanked."""
    fenced, prose, inside = [], [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            prose.append("")
        elif inside:
            fenced.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return fenced, "\n".join(prose)


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every `lm …` command line: in code blocks (``\\`` continuations joined,
    a ``$`` prompt allowed) and in inline code (table pipes ``\\|`` unescaped)."""
    fenced, prose = fenced_and_prose(text)
    found, pending = [], None
    for number, line in fenced:
        if pending is not None:
            pending = (pending[0], pending[1] + " " + line.strip())
        elif COMMAND.match(line.strip()):
            pending = (number, line.strip())
        if pending is not None and not pending[1].endswith("\\"):
            found.append(pending)
            pending = None
        elif pending is not None:
            pending = (pending[0], pending[1][:-1].rstrip())
    for m in INLINE.finditer(prose):
        span = " ".join(m.group(1).replace("\\|", "|").split())
        if COMMAND.match(span):
            found.append((prose.count("\n", 0, m.start()) + 1, span))
    return sorted(found)


def yaml_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, text) of every ```yaml code block."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if current is None and re.match(r"^\s*```ya?ml\s*$", line):
            current = (number + 1, [])
        elif current is not None and FENCE.match(line):
            blocks.append((current[0], "\n".join(current[1])))
            current = None
        elif current is not None:
            current[1].append(line)
    return blocks


def all_commands() -> list[tuple[str, str]]:
    return [(f"{path.name}:{number}", command) for path in DOC_FILES
            for number, command in command_lines(path.read_text())]


# --- the schema -----------------------------------------------------------------------------------------

def key_in_schema(key: str | list[str]) -> bool:
    """True if ``key`` (dotted, or its parts) names a config field: sections and fields by name, list
    entries by index, mapping entries by any key."""
    node: typing.Any = Config
    for part in key.split(".") if isinstance(key, str) else key:
        if typing.get_origin(node) in (typing.Union, types.UnionType):
            options = [a for a in typing.get_args(node) if a is not type(None)]
            node = options[0] if len(options) == 1 else node
        origin, args = typing.get_origin(node), typing.get_args(node)
        if isinstance(node, type) and issubclass(node, BaseModel):
            if part not in node.model_fields:
                return False
            node = node.model_fields[part].annotation
        elif origin is list and (part.isdigit() or part == "N"):  # N: any index, as the reference writes it
            node = args[0]
        elif origin is dict:
            node = args[1]
        else:
            return False
    return True


def is_placeholder(word: str) -> bool:
    """CONFIG, URI, <run>/x, ...: a stand-in for a value, not one."""
    return bool(re.fullmatch(r"[A-Z][A-Z_]*", word)) or any(c in word for c in "<>…") or "..." in word


# --- checking one command line --------------------------------------------------------------------------

def problems_of_command(argv: list[str]) -> list[str]:
    """What is wrong with a full command line (its words after ``lm``)."""
    args, refusal = _parse(argv)
    if refusal and argv[-1].startswith("-"):  # `lm eval --compare`: a reference to an option
        args, _ = _parse([*argv, "VALUE"])
    if args is None:
        if _group_path(argv) is not None:  # `lm registry`, `lm data`: a reference to a command group
            return []
        return [f"the parser refuses it: {refusal}"]
    keys = _override_keys(args.overrides)
    found = [f"unknown config key {key!r}" for key in keys if not key_in_schema(key)]
    config = getattr(args, "config", None)
    usable = config is not None and not is_placeholder(config) and Path(config).name not in WRITTEN_BY_RUNS
    if usable and not (ROOT / config).is_file():
        found.append(f"--config {config}: no such file in the repository")
    if not found and not any(is_placeholder(o) for o in args.overrides):
        try:
            load_config(ROOT / config if usable else None, args.overrides)
        except ConfigError as err:
            found.append(f"its config does not load: {err}")
    return found


def _parse(argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    """(the parsed command line, "") or (None, argparse's complaint)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse_args(argv), ""
    except SystemExit:
        return None, stderr.getvalue().strip().splitlines()[-1]


def _override_keys(overrides: list[str]) -> list[str]:
    return [".".join(parse_override(o)[0]) for o in overrides if o.split("=", 1)[0] != "key.sub"]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})


def _group_path(argv: list[str]) -> argparse.ArgumentParser | None:
    """The command group (a parser with subcommands) ``argv`` names exactly, else None."""
    node = build_parser()
    for word in argv:
        node = _subcommands(node).get(word)
        if node is None:
            return None
    return node if _subcommands(node) else None


def problems_of_synopsis(words: list[str]) -> list[str]:
    """A usage line (``lm eval [--model URI] [--split val | --text URI]``, ``lm registry list | show``):
    its subcommands exist, every option it shows belongs to the subcommand it follows, and every
    ``key=value`` names a config key."""
    words = re.findall(r"[^\s\[\]|…]+", " ".join(words).replace("...", " "))
    parent, node, found = None, build_parser(), []
    for word in words:
        subs = _subcommands(node)
        if word.startswith("-"):
            if word not in {s for a in node._actions for s in a.option_strings}:
                found.append(f"{word}: no such option of {node.prog!r}")
        elif "=" in word:
            found += [f"unknown config key {k!r}" for k in _override_keys([word]) if not key_in_schema(k)]
        elif word in subs:
            parent, node = node, subs[word]
        elif parent is not None and not subs and word in _subcommands(parent):
            node = _subcommands(parent)[word]  # an alternative: `lm registry list | show`
        elif subs:
            found.append(f"{word}: no such command of {node.prog!r}")
    return found


def problems(command: str) -> list[str]:
    """What is wrong with a command line as the docs show it (empty: nothing)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError as err:
        return [f"cannot split it into words: {err}"]
    words = words[2:] if words[0] == "$" else words[1:]
    return problems_of_synopsis(words) if SYNOPSIS.search(" ".join(words)) else problems_of_command(words)


# --- the tests ------------------------------------------------------------------------------------------

def test_configuration_reference_is_current():
    committed = ROOT / DOCS_PATH
    assert committed.is_file(), f"{DOCS_PATH} is missing: run `lm config docs`"
    assert committed.read_text() == render_markdown(), (
        f"{DOCS_PATH} is stale (the config schema changed): run `lm config docs` and commit the result")


def test_configuration_reference_covers_every_field():
    text = render_markdown()
    assert text == render_markdown()  # deterministic
    for key in ("name", "train.lr", "data.sources.N.uri", "train.distill.teacher",
                "serve.autoscaling.max_replicas", "tune.space.KEY.loguniform", "continual.gate.N.min_improvement",
                "eval.sets.N.split", "rag.sources.N.weight", "serve.feedback.enabled", "data.sft.prompt_field"):
        assert f"| `{key}` |" in text, key
    rows = re.findall(r"^\| `([^`]+)` \| (.+?) \| (.+?) \| (.*) \|$", text, flags=re.M)
    assert len(rows) > 200
    undocumented = [key for key, _, _, about in rows if not about.strip()]
    assert not undocumented, f"fields without a description: {undocumented}"
    assert all(key_in_schema(k.replace(".N.", ".0.").replace(".KEY.", ".x.")) for k, *_ in rows)


def test_commands_are_found():
    """The extractor sees code blocks, inline code, table cells, `$` prompts and .venv/bin/lm."""
    text = ("Run `lm train -c configs/tiny.yaml\ntrain.lr=1e-3` then\n\n```bash\n$ lm eval --split val\n"
            ".venv/bin/lm run \\\n  model.n_layers=2  # comment\nmake demo\n```\n"
            "| `lm serve [--render F \\| --ask P]` |\n"
            "`python -m lm.cli` and `lm` alone are not command lines.\n")
    assert [c for _, c in command_lines(text)] == [
        "lm train -c configs/tiny.yaml train.lr=1e-3", "$ lm eval --split val",
        ".venv/bin/lm run model.n_layers=2  # comment", "lm serve [--render F | --ask P]"]


@pytest.mark.parametrize(("command", "problem"), [
    ("lm train -c configs/tiny.yaml train.lrr=1e-3", "unknown config key 'train.lrr'"),
    ("lm run -c configs/nope.yaml", "no such file"),
    ("lm evaluate --model x", "the parser refuses it"),
    ("lm eval --splits val", "the parser refuses it"),
    ("lm eval --splits", "the parser refuses it"),
    ("lm train model.n_layers=-1", "does not load"),
    ("lm eval [--model URI] [--modle URI]", "--modle: no such option"),
    ("lm registry list | show [ID] | add --reason R", "--reason: no such option"),
])
def test_a_wrong_command_is_caught(command, problem):
    assert any(problem in p for p in problems(command)), problems(command)


@pytest.mark.parametrize(("where", "command"), all_commands())
def test_documented_command_lines_parse(where, command):
    found = problems(command)
    assert not found, f"{where}: `{command}`: " + "; ".join(found)


def test_config_keys_in_prose_exist():
    """Inline code naming a config key (`train.workers`, `serve.colocate: true`, `train.lr=5e-4`) names a
    real one."""
    sections = "|".join(name for name in Config.model_fields if "." not in name)
    pattern = re.compile(rf"({sections})(\.[A-Za-z_0-9]+)+(\.\*)?(\s*[:=].*)?")
    wrong = []
    for path in DOC_FILES:
        _, prose = fenced_and_prose(path.read_text())
        for m in INLINE.finditer(prose):
            span = " ".join(m.group(1).split())
            if not pattern.fullmatch(span):
                continue
            key = re.split(r"\s*[:=]", span, maxsplit=1)[0].removesuffix(".*")
            if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES and not key_in_schema(key):
                wrong.append(f"{path.name}:{prose.count(chr(10), 0, m.start()) + 1}: `{span}`")
    assert not wrong, "config keys that are not in the schema (lm/config/): " + ", ".join(wrong)


def _leaf_paths(tree: typing.Any, prefix: tuple[str, ...] = ()) -> list[list[str]]:
    if isinstance(tree, dict) and tree:
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*prefix, str(k)))]
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        return [p for i, v in enumerate(tree) for p in _leaf_paths(v, (*prefix, str(i)))]
    return [list(prefix)]


def test_config_keys_in_yaml_examples_exist():
    """A ```yaml example of config sections (`train: {distill: {teacher: …}}`) uses only real keys, and
    its tune.space searches real keys too."""
    wrong = []
    for path in DOC_FILES:
        for number, block in yaml_blocks(path.read_text()):
            tree = yaml.safe_load(block)
            if not isinstance(tree, dict) or not set(tree) <= set(Config.model_fields):
                continue  # not a config (a Serve config, a key file, ...)
            keys = _leaf_paths(tree)
            keys += [k.split(".") for k in (tree.get("tune") or {}).get("space") or {}]
            wrong += [f"{path.name}:{number}: {'.'.join(k)}" for k in keys if not key_in_schema(k)]
    assert not wrong, "config keys in YAML examples that are not in the schema (lm/config/): " + \
        ", ".join(wrong)


def test_make_help_lists_every_target():
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, flags=re.M).group(1).split()
    described = set(re.findall(r"^([A-Za-z_-]+):.*## \S", makefile, flags=re.M))
    assert "help" in phony
    assert set(phony) <= described, f"targets without a `## ...` line (make help): {set(phony) - described}"
