"""The ``lm`` command line: the parser and ``main``. Each subcommand loads the config, then calls its function
in lm.commands. The jobs (run, data, train, tune, serve, eval, continual) send the libraries' logs to the
run's log file (lm.logfile) and say where once, and so do Ray's C++ notes in the driver (lm.native_stderr);
``--verbose`` on any command shows them live as well.

    lm run              [--config F] [key.sub=value ...]   the main job (make demo)
    lm data prepare     [--config F] [key.sub=value ...]   corpora → cleaned, deduplicated token shards (Ray Data)
    lm train            [--config F] [key.sub=value ...]   Ray Train + DeepSpeed on the shards (resumes a run)
    lm tune [--resume]  [--config F] [key.sub=value ...]   Ray Tune sweep over training (cfg.tune.space)
    lm serve [--render F [--rayservice] | --ask P] [--config F] [key.sub=value ...]
                                                            Ray Serve: OpenAI-compatible API
                                                            (or write a Serve config / RayService)
    lm config show      [--config F] [key.sub=value ...]   print the resolved config
    lm config docs      [--out F] [--check]                 write docs/configuration.md from the schema
    lm tokenizer train  [--config F] [key.sub=value ...]   train + publish the BPE tokenizer
    lm generate [--model URI] [--prompt P] [--config F] [key.sub=value ...]
    lm chat [--model URI | --endpoint URL] [--system S] [--config F] [key.sub=value ...]   a terminal chat
    lm eval [--model URI] [--split S] [--text URI] [--compare URI] [--config F] [key.sub=value ...]
                                                            metrics, n-gram baseline, report (exit 1: comparison failed)
    lm eval --harness TASK[,TASK...] [--endpoint URL] [--model URI] [--compare URI] ...
                                                            lm-evaluation-harness tasks only
                                                            (model directory or endpoint)
    lm registry list | show [ID|ALIAS] | add --model URI | promote ID | reject ID | rollback   the model registry
    lm continual [--watch [--iterations N]] [--config F] [key.sub=value ...]
                                                            new data + feedback → fine-tune → gate → promote / reject
    lm summary [--sweep F] [--config F] [key.sub=value ...]   the run's summary card (make demo ends with it)
    lm rag build | search QUERY [--top-k K] [--config F] [key.sub=value ...]
                                                            the retrieval index (rag.sources → rag.index) / a lookup
    lm lineage REF [--json] [--verify] [--config F]        provenance: response / version / model → data
    lm prune --out URI --sparsity S --method unstructured|heads|channels [--model URI] [--scope global|matrix]
             [--finetune-steps N] [--data URI] [--config F] [key.sub=value ...]   magnitude pruning (lm.compress.prune)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from lm.commands import (
    cmd_chat,
    cmd_config_docs,
    cmd_config_show,
    cmd_continual,
    cmd_data_prepare,
    cmd_eval,
    cmd_generate,
    cmd_prune,
    cmd_rag,
    cmd_registry,
    cmd_run,
    cmd_serve,
    cmd_summary,
    cmd_tokenizer_train,
    cmd_train,
    cmd_tune,
)
from lm.config import ConfigError, load_config
from lm.lineage_text import add_parser as lineage_parser

JOBS = ("run", "data", "train", "tune", "serve", "eval", "continual")  # log to <run>/logs/<command>.log


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML preset, e.g. configs/tiny.yaml (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show the libraries' own progress and INFO logs (Ray Data's stage dumps)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description="lmforge: build, train and serve a GPT-style model on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable, help_text: str, parent=sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help_text, description=help_text)
        _config_args(p)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "the main job: tokenizer → train → sample, under the run URI")
    data = sub.add_parser("data", help="data pipeline").add_subparsers(dest="action", required=True)
    add("prepare", cmd_data_prepare, "read, clean, dedup, split, tokenize and pack the configured sources", data)
    add("train", cmd_train, "train on the prepared shards with Ray Train + DeepSpeed (re-running resumes)")
    tune = add("tune", cmd_tune, "search hyperparameters with Ray Tune (tune.space), each trial a real training run")
    tune.add_argument("--resume", action="store_true", help="continue the run's interrupted (or finished) sweep")
    srv = add("serve", cmd_serve, "host the model behind an OpenAI-compatible API on Ray Serve (blocks)")
    srv.add_argument("--render", metavar="FILE", help="write a Serve config file (serve deploy, RayService) and exit")
    srv.add_argument("--ask", metavar="PROMPT", help="deploy, answer PROMPT through the openai client, stop")
    srv.add_argument("--rayservice", action="store_true", help="with --render: a KubeRay RayService manifest instead")
    config = sub.add_parser("config", help="inspect configuration").add_subparsers(dest="action", required=True)
    add("show", cmd_config_show, "print the resolved config (preset + overrides, secrets masked)", config)
    docs = config.add_parser("docs", help="write the configuration reference (every section and field, from "
                             "the schema)", description="write the configuration reference from the schema")
    docs.add_argument("--out", default="docs/configuration.md", help="where (default: docs/configuration.md)")
    docs.add_argument("--check", action="store_true", help="write nothing; exit 2 if the file is stale")
    docs.set_defaults(func=cmd_config_docs, config=None, overrides=[])
    tokenizer = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    add("train", cmd_tokenizer_train, "train the BPE tokenizer on the configured sources", tokenizer)
    _model_commands(add)
    cont = add("continual", cmd_continual, "one continual-learning iteration: new documents and feedback → "
               "fine-tune production → gate → promote or reject (a re-run resumes an interrupted one)")
    cont.add_argument("--watch", action="store_true", help="repeat every continual.interval_s seconds")
    cont.add_argument("--iterations", type=int, help="with --watch: stop after N iterations")
    rag = sub.add_parser("rag", help="retrieval-augmented generation: the passage index").add_subparsers(
        dest="action", required=True)
    add("build", cmd_rag, "index rag.sources (BM25 over passages) into rag.index", rag)
    rag_search = rag.add_parser("search", help="the best passages for a query", description="the best passages")
    rag_search.add_argument("query")
    rag_search.add_argument("--top-k", type=int, help="passages to show (default: rag.top_k)")
    _config_args(rag_search)
    rag_search.set_defaults(func=cmd_rag)
    summary = add("summary", cmd_summary, "the run's summary card: what was built, validation bits/byte against "
                  "the n-gram baseline, tokens/s, time per stage, where things are, what to try next")
    summary.add_argument("--sweep", metavar="F",
                         help="also the sweep of this tune config (e.g. configs/tune/demo.yaml)")
    _registry_commands(sub)
    lineage_parser(sub)
    return parser


def _model_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The commands that read a model directory: generate, chat, eval, prune."""
    gen = add("generate", cmd_generate, "continue a prompt with a saved model directory")
    gen.add_argument("--model", help="model directory URI (default: <run>/model)")
    gen.add_argument("--prompt", help="prompt text (default: generate.prompt)")
    chat = add("chat", cmd_chat, "chat in the terminal (streamed, with history) with a model directory or an endpoint")
    chat.add_argument("--model", help="model directory URI (default: <run>/model)")
    chat.add_argument("--endpoint", metavar="URL", help="a running lmforge endpoint (http://host:port/v1) instead; "
                      "the key from LMFORGE_API_KEY or the first of LMFORGE_API_KEYS")
    chat.add_argument("--system", help="a system message in front of the conversation")
    ev = add("eval", cmd_eval, "evaluate a model directory: metrics, n-gram baseline, generation scores, report")
    ev.add_argument("--model", help="model directory URI (default: <run>/model)")
    ev.add_argument("--split", choices=["train", "val", "test"], help="score this split of the run's shards only")
    ev.add_argument("--text", metavar="URI", help="score this text source (file, folder or glob) only")
    ev.add_argument("--compare", metavar="URI", help="baseline model directory or report.json, judged by eval.compare")
    ev.add_argument("--harness", metavar="TASK[,TASK...]", help="run only these lm-evaluation-harness tasks (shipped: "
                    "lmforge_cloze, lmforge_who_speaks; eval.harness.limit items each)")
    ev.add_argument("--endpoint", metavar="URL", help="with --harness: score a running lmforge endpoint "
                    "(http://host:port/v1, local-completions) serving --model, whose tokenizer makes the requests")
    pr = add("prune", cmd_prune, "magnitude pruning of a model directory (unstructured, or whole attention heads / "
             "MLP channels, which shrinks the model), optionally fine-tuned a few steps, into a new directory")
    pr.add_argument("--model", help="model directory URI (default: <run>/model)")
    pr.add_argument("--out", required=True, help="where the pruned model directory goes")
    pr.add_argument("--sparsity", type=float, required=True, help="fraction to remove, in [0, 1)")
    pr.add_argument("--method", required=True, help="unstructured | heads | channels")
    pr.add_argument("--scope", default="matrix",
                    help="unstructured: rank weights per matrix (matrix) or all at once (global)")
    pr.add_argument("--finetune-steps", type=int, default=0, help="then train this many steps (train.*, plain loop)")
    pr.add_argument("--data", help="fine-tuning data folder (default: what the model was trained on, else <run>/data)")


def _registry_commands(sub) -> None:
    """``lm registry list | show | add | promote | reject | rollback``."""
    registry = sub.add_parser("registry", help="the model registry (versions, production / previous)")
    reg = registry.add_subparsers(dest="action", required=True)

    def reg_cmd(action: str, text: str, *positional: tuple[str, dict]) -> argparse.ArgumentParser:
        p = reg.add_parser(action, help=text, description=text)
        for name, kw in positional:  # before the config overrides, which take every other word
            p.add_argument(name, **kw)
        _config_args(p)
        p.set_defaults(func=cmd_registry)
        return p

    reg_cmd("list", "every version with its status and aliases")
    reg_cmd("show", "one version (id or alias) as JSON", ("ref", {"nargs": "?", "default": "production"}))
    reg_add = reg_cmd("add", "register a model directory as a candidate version")
    reg_add.add_argument("--model", required=True, help="model directory URI")
    reg_add.add_argument("--parent", help="the version it was trained from")
    reg_add.add_argument("--note")
    reg_cmd("promote", "make a version production (the old one becomes previous)",
            ("version", {})).add_argument("--reason")
    reg_cmd("reject", "mark a candidate rejected", ("version", {})).add_argument("--reason")
    reg_cmd("rollback", "put the previous production version back").add_argument("--reason")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line as ``lm`` reads it (argparse exits 2 with a message on a bad one)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options (`lm generate --prompt P train.seed=3`)
    if bad := [a for a in extra if a.startswith("-") or "=" not in a]:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "verbose", False):
        os.environ["LMFORGE_VERBOSE"] = "1"  # lm.cluster leaves the libraries' own output on
    from lm.data.sources import DataError
    from lm.rag import RagError
    from lm.registry import RegistryError
    from lm.storage import StorageError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command in JOBS and not getattr(args, "render", None):
            from lm.logfile import open_log_file

            verbose = bool(getattr(args, "verbose", False))
            path = open_log_file(cfg.run_uri, cfg.name, args.command, verbose=verbose)
            print(f"log file: {path} (Ray, DeepSpeed, library logs; lm --verbose shows them here too)", flush=True)
            if argv is None and not verbose:  # the `lm` command itself, not a caller's (a test's) process
                from lm.native_stderr import route_native_stderr

                route_native_stderr()
        print(args.func(cfg, args))
    except (ConfigError, StorageError, DataError, RegistryError, RagError, FileNotFoundError) as err:
        print(f"lm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
