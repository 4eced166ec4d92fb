"""The ``lm`` command. Each subcommand loads the config, then calls one function in ``lm``.

    lm run              [--config F] [key.sub=value ...]   the main job (make demo)
    lm data prepare     [--config F] [key.sub=value ...]   corpora → cleaned, deduplicated token shards (Ray Data)
    lm train            [--config F] [key.sub=value ...]   Ray Train + DeepSpeed on the shards (resumes a run)
    lm tune [--resume]  [--config F] [key.sub=value ...]   Ray Tune sweep over training (cfg.tune.space)
    lm serve [--render F [--rayservice] | --ask P] [--config F] [key.sub=value ...]
                                                            Ray Serve: OpenAI-compatible API (or write a Serve config / RayService)
    lm config show      [--config F] [key.sub=value ...]   print the resolved config
    lm config docs      [--out F] [--check]                 write docs/configuration.md from the schema
    lm tokenizer train  [--config F] [key.sub=value ...]   train + publish the BPE tokenizer
    lm generate [--model URI] [--prompt P] [--config F] [key.sub=value ...]
    lm eval [--model URI] [--split S] [--text URI] [--compare URI] [--config F] [key.sub=value ...]
                                                            metrics, n-gram baseline, report (exit 1: comparison failed)
    lm eval --harness TASK[,TASK...] [--endpoint URL] [--model URI] [--compare URI] ...
                                                            lm-evaluation-harness tasks only (model directory or endpoint)
    lm registry list | show [ID|ALIAS] | add --model URI | promote ID | reject ID | rollback   the model registry
    lm continual [--watch [--iterations N]] [--config F] [key.sub=value ...]
                                                            new data + feedback → fine-tune → gate → promote / reject
    lm rag build | search QUERY [--top-k K] [--config F] [key.sub=value ...]
                                                            the retrieval index (rag.sources → rag.index) / a lookup
    lm prune --out URI --sparsity S --method unstructured|heads|channels [--model URI] [--scope global|matrix]
             [--finetune-steps N] [--data URI] [--config F] [key.sub=value ...]   magnitude pruning (lm.compress.prune)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from lm.config import Config, ConfigError, dump_yaml, join_uri, load_config


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML preset, e.g. configs/tiny.yaml (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    parser.add_argument("--verbose", "-v", action="store_true",
                        help="also show the libraries' own progress and INFO logs (Ray Data's stage dumps)")


def cmd_run(cfg: Config, args: argparse.Namespace) -> str:
    from lm.pipeline import run_main

    summary = run_main(cfg)
    return (f"run {cfg.name}: {summary['steps']} steps, loss {summary['final_loss']:.3f} → {summary['model_uri']}; "
            f"evaluation report → {summary['eval_report']}")


def cmd_data_prepare(cfg: Config, args: argparse.Namespace) -> str:
    from lm.data.pipeline import prepare_data

    manifest = prepare_data(cfg)
    splits = ", ".join(f"{s} {e.docs:,} docs / {e.tokens:,} tokens" for s, e in sorted(manifest.splits.items()))
    return (f"data: {splits}; {len(manifest.shards)} shards, {len(manifest.skipped_objects)} skipped objects "
            f"→ {cfg.data_uri}/manifest.json")


def cmd_train(cfg: Config, args: argparse.Namespace) -> str:
    from lm.train.trainer import train

    summary = train(cfg)
    last = summary.history[-1]
    val = f", val {last['val_loss']:.3f}" if "val_loss" in last else ""
    return f"train {cfg.name}: {summary.steps} steps in {summary.seconds:.0f} s, loss {last['loss']:.3f}{val} → {summary.model_uri}"


def cmd_tune(cfg: Config, args: argparse.Namespace) -> str:
    from lm.tune.sweep import tune

    result = tune(cfg, resume=args.resume)
    values = ", ".join(f"{k}={v}" for k, v in result.best_params.items())
    return (f"tune {cfg.name}: {len(result.table)} trials ({result.stopped_early} stopped early); best {values}: "
            f"{cfg.tune.metric} {result.best_value:.4f} → {result.uris['best']}")


def cmd_serve(cfg: Config, args: argparse.Namespace) -> str:
    from lm.serve.deploy import render, start

    if args.render:
        from pathlib import Path

        if args.rayservice:
            from lm.infra import rayservice

            Path(args.render).write_text(rayservice(cfg, args.config, args.overrides))
            return f"serve: KubeRay RayService → {args.render} (kubectl apply -f {args.render})"
        Path(args.render).write_text(render(cfg, args.config, args.overrides))
        return f"serve: Serve config → {args.render} (serve deploy {args.render})"
    if args.ask is not None:
        from lm.sample_text import show_documents
        from lm.serve.deploy import ask_once

        done = ask_once(cfg, args.ask)
        print(show_documents(args.ask + done["choices"][0]["text"], cfg.tokenizer.eos_token))
        return (f"serve: answered {done['usage']['completion_tokens']} tokens through the openai client at "
                f"http://{cfg.serve.host}:{cfg.serve.port}/v1 (model version {done['system_fingerprint']}), then stopped")
    start(cfg)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}/v1"
    print(f"serve: {cfg.serve.model_name} at {url} (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return "serve: stopped"


def cmd_config_show(cfg: Config, args: argparse.Namespace) -> str:
    print(dump_yaml(cfg), end="")
    return f"config {cfg.name}: hash {cfg.fingerprint()}, run URI {cfg.run_uri}"


def cmd_config_docs(cfg: Config, args: argparse.Namespace) -> str:
    from pathlib import Path

    from lm.config.docs import render_markdown

    out, text = Path(args.out), render_markdown()
    if args.check:
        if not out.is_file() or out.read_text() != text:
            raise ConfigError(f"{out} is missing or stale: run `lm config docs` to regenerate it")
        return f"config docs: {out} is up to date"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return f"config docs: every section and field of the schema → {out}"


def cmd_tokenizer_train(cfg: Config, args: argparse.Namespace) -> str:
    from lm.data.sources import plan_files
    from lm.pipeline import tokenizer_stage
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    plan_files(store, cfg.data)  # fail before any work if a source is missing
    report = tokenizer_stage(store, cfg)
    return (f"tokenizer: {report.tokenizer.vocab_size} tokens, {report.bytes_per_token:.2f} bytes/token, "
            f"{report.seconds:.1f} s → {report.uri}")


def cmd_generate(cfg: Config, args: argparse.Namespace) -> str:
    from lm.inference import generate_text
    from lm.modeldir import load_model_dir
    from lm.sample_text import show_documents
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    model_uri = args.model or join_uri(cfg.run_uri, "model")
    gen = cfg.generate if args.prompt is None else cfg.generate.model_copy(update={"prompt": args.prompt})
    loaded = load_model_dir(store, model_uri)
    start = time.perf_counter()
    text = generate_text(loaded.model, loaded.tokenizer, [gen.prompt], gen)[0]
    seconds = time.perf_counter() - start
    print(show_documents(gen.prompt + text, loaded.tokenizer.eos_token))
    out_uri = join_uri(cfg.run_uri, "generations", f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    record = {"model": model_uri, "prompt": gen.prompt, "completion": text, **gen.model_dump(exclude={"prompt"})}
    store.write_text(out_uri, json.dumps(record, indent=2))
    return f"generate: {len(loaded.tokenizer.encode(text))} tokens in {seconds:.1f} s from {model_uri} → {out_uri}"


def cmd_chat(cfg: Config, args: argparse.Namespace) -> str:
    from lm.chat_terminal import EndpointChat, LocalChat, run_chat
    from lm.storage import ObjectStore

    if args.endpoint:
        key = os.environ.get("LMFORGE_API_KEY") or os.environ.get("LMFORGE_API_KEYS", "").split(",")[0].strip()
        backend, source = EndpointChat(args.endpoint, key or "none", cfg.generate), args.endpoint
    else:
        source = args.model or join_uri(cfg.run_uri, "model")
        backend = LocalChat(ObjectStore(cfg.storage), source, cfg.generate)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {source}: /reset forgets the conversation, /exit (or Ctrl-D) ends")
    replies = run_chat(backend, sys.stdin, sys.stdout, interactive=interactive, system=args.system)
    return f"chat: {replies} replies from {source}"


def cmd_eval(cfg: Config, args: argparse.Namespace) -> str:
    from lm.config.eval import EvalSetConfig
    from lm.eval.evaluate import evaluate

    sets = [EvalSetConfig(name=args.split, split=args.split)] if args.split else []
    sets += [EvalSetConfig(name="text", uri=args.text)] if args.text else []
    if sets:
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"sets": sets})})
    if args.endpoint and not args.harness:
        raise ConfigError("--endpoint scores harness tasks: give --harness TASK[,TASK...] too")
    if args.harness:  # only the harness: only the compare rules on its metrics apply
        harness = cfg.eval.harness.model_copy(update={"tasks": [t.strip() for t in args.harness.split(",") if t.strip()]})
        rules = [r for r in cfg.eval.compare if r.set == "harness"]
        if args.compare and not rules:
            raise ConfigError("--harness with --compare: give eval.compare rules on harness metrics, e.g. "
                              "'eval.compare=[{set: harness, metric: lmforge_cloze/acc, max_regression: 0.05}]'")
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"harness": harness, "compare": rules})})
    result = evaluate(cfg, model_uri=args.model, compare_to=args.compare, harness_only=bool(args.harness),
                      endpoint=args.endpoint)
    scores = ", ".join([*(f"{name} {s['model']['bpb']:.3f} bpb" + (f" (n-gram {s['ngram']['bpb']:.3f})" if s["ngram"]
                                                                   else "") for name, s in result.report["sets"].items()),
                        *(f"{k} {v:.3f}" for k, v in result.metrics.items() if k.startswith("harness/"))])
    verdict = "" if result.verdict is None else f"; comparison {'PASSED' if result.verdict.passed else 'FAILED'}"
    line = f"eval: {scores}{verdict} in {result.seconds:.0f} s → {result.report_uri}"
    if result.verdict is not None and not result.verdict.passed:
        print(line)
        raise SystemExit(1)
    return line


def cmd_registry(cfg: Config, args: argparse.Namespace) -> str:
    from lm.registry import Registry, table
    from lm.storage import ObjectStore

    reg = Registry(ObjectStore(cfg.storage), cfg.registry_uri)
    if args.action == "list":
        return table(reg.versions(), reg.state()) + f"\n({cfg.registry_uri})"
    if args.action == "show":
        from dataclasses import asdict

        return json.dumps(asdict(reg.get(args.ref)), indent=2)
    if args.action == "add":
        v = reg.register(args.model, parent=args.parent, note=args.note or "")
        return f"registered {v.id} ({v.model_uri}) as a candidate"
    if args.action == "promote":
        state = reg.promote(args.version, reason=args.reason or "promoted by hand")
    elif args.action == "reject":
        state = reg.reject(args.version, reason=args.reason or "rejected by hand")
    else:
        state = reg.rollback(reason=args.reason or "rolled back by hand")
    return f"{args.action}: production = {state['aliases'].get('production')}, previous = " \
           f"{state['aliases'].get('previous', '-')}"


def cmd_continual(cfg: Config, args: argparse.Namespace) -> str:
    from lm.continual.iteration import run_iteration, watch
    from lm.registry import Registry, table
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    if args.watch:
        watch(cfg, store, iterations=args.iterations)
        outcome = "watch ended"
    else:
        found = run_iteration(cfg, store)
        outcome = f"continual: {found['verdict']}" + (f" {found['version']}" if found.get("version") else "")
    reg = Registry(store, cfg.registry_uri)
    return f"{outcome}\n{table(reg.versions(), reg.state())}"


def cmd_rag(cfg: Config, args: argparse.Namespace) -> str:
    from lm.rag import RagIndex, build_index

    if args.action == "build":
        manifest = build_index(cfg)
        return json.dumps({k: manifest[k] for k in ("passages", "documents")} | {"index": cfg.rag_uri})
    from lm.storage import ObjectStore

    hits = RagIndex.load(ObjectStore(cfg.storage), cfg.rag_uri).search(args.query, args.top_k or cfg.rag.top_k)
    return "\n".join(f"{h['score']:8.3f}  {h['id']}  {h['text'][:100]}" for h in hits) or "(no passage shares a word)"


def cmd_prune(cfg: Config, args: argparse.Namespace) -> str:
    from lm.compress.prune import PruneError, prune_dir
    from lm.storage import ObjectStore

    model_uri = args.model or join_uri(cfg.run_uri, "model")
    try:
        r = prune_dir(ObjectStore(cfg.storage), model_uri, args.out, args.sparsity, args.method, scope=args.scope,
                      finetune_steps=args.finetune_steps, cfg=cfg, data_uri=args.data)
    except PruneError as err:
        raise ConfigError(f"lm prune: {err}") from None
    tuned = f", fine-tuned {r['finetune']['steps']} steps" if "finetune" in r else ""
    return (f"prune {args.method}: {r['params_before']:,} → {r['params_after']:,} parameters, measured sparsity "
            f"{r['actual_sparsity']:.4f} of the block weights{tuned} → {r['uri']}")


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
    pr = add("prune", cmd_prune, "magnitude pruning of a model directory (unstructured, or whole attention heads / "
             "MLP channels, which shrinks the model), optionally fine-tuned a few steps, into a new directory")
    pr.add_argument("--model", help="model directory URI (default: <run>/model)")
    pr.add_argument("--out", required=True, help="where the pruned model directory goes")
    pr.add_argument("--sparsity", type=float, required=True, help="fraction to remove, in [0, 1)")
    pr.add_argument("--method", required=True, help="unstructured | heads | channels")
    pr.add_argument("--scope", default="matrix", help="unstructured: rank weights per matrix (matrix) or all at once (global)")
    pr.add_argument("--finetune-steps", type=int, default=0, help="then train this many steps (train.*, plain loop)")
    pr.add_argument("--data", help="fine-tuning data folder (default: what the model was trained on, else <run>/data)")
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
    return parser


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
        print(args.func(cfg, args))
    except (ConfigError, StorageError, DataError, RegistryError, RagError, FileNotFoundError) as err:
        print(f"lm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
