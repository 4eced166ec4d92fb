"""What each ``lm`` subcommand does (lm.cli parses the command line and calls one of these): load what it
needs, call one function in ``lm``, return the one-line summary ``lm`` prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from lm.config import Config, ConfigError, dump_yaml, join_uri, load_config
from lm.logfile import log_path
from lm.progress import live_progress


def cmd_run(cfg: Config, args: argparse.Namespace) -> str:
    from lm.pipeline import run_main

    with live_progress():
        summary = run_main(cfg)
    return (f"run {cfg.name}: {summary['steps']} steps, loss {summary['final_loss']:.3f} → {summary['model_uri']}; "
            f"evaluation report → {summary['eval_report']} (the card: {prog()} summary{_config_flag(args)})")


def cmd_summary(cfg: Config, args: argparse.Namespace) -> str:
    from lm.card import card, read_summary, registry_info, sweep_info
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    summary = read_summary(store, cfg)
    if summary is None:
        raise ConfigError(f"no run at {cfg.run_uri} yet (no samples.json): "
                          f"run `{prog()} run{_config_flag(args)}` first")
    sweep = sweep_info(store, load_config(args.sweep)) if args.sweep else None
    return card(summary, config=args.config, prog=prog(), registry=registry_info(store, cfg.registry_uri),
                sweep=sweep, logs=str(log_path(cfg.run_uri, cfg.name, "run").parent))


def prog() -> str:
    """How this ``lm`` was called, for the commands a message suggests (``.venv/bin/lm`` under the
    current folder, else ``lm``)."""
    path = os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0].endswith("/lm") else "lm"
    return "lm" if path.startswith("..") or os.sep not in path else path


def _config_flag(args: argparse.Namespace) -> str:
    return f" -c {args.config}" if getattr(args, "config", None) else ""


def cmd_data_prepare(cfg: Config, args: argparse.Namespace) -> str:
    from lm.data.pipeline import prepare_data

    return prepare_data(cfg).summary_table()


def cmd_train(cfg: Config, args: argparse.Namespace) -> str:
    from lm.train.trainer import train

    with live_progress():
        summary = train(cfg)
    last = summary.history[-1]
    val = f", val {last['val_loss']:.3f}" if "val_loss" in last else ""
    return (f"train {cfg.name}: {summary.steps} steps in {summary.seconds:.0f} s, loss {last['loss']:.3f}{val} "
            f"→ {summary.model_uri}")


def cmd_tune(cfg: Config, args: argparse.Namespace) -> str:
    from lm.tune.sweep import tune

    with live_progress():
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
                f"http://{cfg.serve.host}:{cfg.serve.port}/v1 (model version {done['system_fingerprint']}), "
                "then stopped")
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
        tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
        harness = cfg.eval.harness.model_copy(update={"tasks": tasks})
        rules = [r for r in cfg.eval.compare if r.set == "harness"]
        if args.compare and not rules:
            raise ConfigError("--harness with --compare: give eval.compare rules on harness metrics, e.g. "
                              "'eval.compare=[{set: harness, metric: lmforge_cloze/acc, max_regression: 0.05}]'")
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"harness": harness, "compare": rules})})
    result = evaluate(cfg, model_uri=args.model, compare_to=args.compare, harness_only=bool(args.harness),
                      endpoint=args.endpoint)
    scores = ", ".join([*(f"{name} {s['model']['bpb']:.3f} bpb"
                          + (f" (n-gram {s['ngram']['bpb']:.3f})" if s["ngram"] else "")
                          for name, s in result.report["sets"].items()),
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
    from lm.registry import Registry
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    with live_progress():  # each iteration prints its verdict (lm.continual.iteration)
        if args.watch:
            watch(cfg, store, iterations=args.iterations)
        else:
            run_iteration(cfg, store)
    reg = Registry(store, cfg.registry_uri)
    aliases = ", ".join(f"{alias} {vid}" for alias, vid in sorted(reg.state()["aliases"].items()))
    return (f"registry: {len(reg.versions())} versions ({aliases or 'no aliases'}); "
            f"`{prog()} registry list{_config_flag(args)}` lists them")


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
