"""``lm lineage``: the provenance chain (lm.lineage) as text for people, or JSON (``--json``), verified on
request (``--verify``: exit 1 when a recomputed hash differs).

    lm lineage chatcmpl-3f… -c configs/tiny.yaml --verify
"""

from __future__ import annotations

import argparse
import time

from lm.config import Config
from lm.lineage import Chain, DataLink, all_checks, build_chain, verify_chain


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _short(h: str | None, n: int = 16) -> str:
    return (h[:n] + "…") if h and len(h) > n else (h or "-")


def _data_lines(data: DataLink, pad: str) -> list[str]:
    lines = [f"{pad}data manifest {data.uri} ({data.kind}, inputs {data.inputs_fingerprint}, "
             f"{len(data.shards)} shards)"]
    lines += [f"{pad}  shard {s.split:<5} {s.rows:>7,} rows  sha256 {_short(s.sha256)}  {s.uri}" for s in data.shards]
    for name, objects in data.sources.items():
        lines.append(f"{pad}  source {name}: {len(objects)} objects")
        for o in objects:
            what = (f"ETag {o.etag}" if o.etag is not None else
                    f"mtime {_when(o.mtime) if o.mtime is not None else '-'}  sha256 {_short(o.sha256)}")
            lines.append(f"{pad}    {o.uri}  {o.size:,} bytes  {what}")
    for part, link in data.parts.items():
        lines.append(f"{pad}  {part}:")
        lines += _data_lines(link, pad + "    ")
    return lines


def chain_lines(chain: Chain, pad: str = "") -> list[str]:
    """The chain as indented lines, response first, sources last; a continual version's parent nested."""
    lines = []
    if (r := chain.response) is not None:
        lines.append(f"{pad}response {r.id} ({r.type}, {_when(r.time)}) → model version {r.model_version}  [{r.log}]")
    if (v := chain.version) is not None:
        lines.append(f"{pad}version {v.id} ({v.status}) parent {v.parent or '-'}, created {_when(v.created)}"
                     + (f", continual iteration {v.iteration}" if v.iteration is not None else "")
                     + (f", code {v.code_version}" if v.code_version else ""))
        if v.gate_report:
            lines.append(f"{pad}  gate report {v.gate_report}")
    if (run := chain.run) is not None:
        lines.append(f"{pad}model {run.model_uri}")
        losses = "".join(f", {name} {v:.4f}" for name, v in (("loss", run.final_loss), ("val", run.val_loss))
                         if v is not None)
        lines.append(f"{pad}run {run.run or '-'} ({run.trainer or '-'}): config {run.config_hash or '-'} "
                     f"[{run.config or '-'}], commit {run.code_commit or 'unknown'}, seed {run.seed}, "
                     f"{run.steps} steps, {run.tokens:,} tokens{losses}")
    if chain.data is not None:
        lines += _data_lines(chain.data, pad)
    if (c := chain.continual) is not None:
        lines.append(f"{pad}ledger iteration {c.iteration}: {len(c.inputs)} inputs")
        lines += [f"{pad}  {uri}  ETag {tag}" for uri, tag in sorted(c.inputs.items())]
        if c.parent is not None:
            lines.append(f"{pad}parent version {c.parent.ref}:")
            lines += chain_lines(c.parent, pad + "    ")
    for check in chain.checks:
        if not check.ok:
            lines.append(f"{pad}FAILED {check.what}: {check.detail}")
    return lines


def cmd_lineage(cfg: Config, args: argparse.Namespace) -> str:
    """``lm lineage REF [--json] [--verify]`` (exit 1 when ``--verify`` finds a difference)."""
    from lm.storage import ObjectStore

    store = ObjectStore(cfg.storage)
    chain = build_chain(cfg, store, args.ref)
    if args.verify:
        chain = verify_chain(store, chain)
    checks = all_checks(chain)
    failed = [c for c in checks if not c.ok]
    if args.json:
        out = chain.model_dump_json(indent=2, exclude_none=True)
    else:
        out = "\n".join(chain_lines(chain))
        if args.verify:
            out += f"\nverify: {len(checks) - len(failed)} of {len(checks)} hashes match" + (
                "" if not failed else f"; {len(failed)} differ")
    if failed:
        print(out)
        raise SystemExit(1)
    return out


def add_parser(sub) -> None:
    """``lm lineage`` in lm.cli's parser."""
    p = sub.add_parser("lineage", help="the provenance chain of a response, registry version or model directory",
                       description="response id -> model version -> registry record -> training run -> data "
                       "manifest -> shards -> source objects (continual versions: ledger inputs, parent version)")
    p.add_argument("ref", help="a response id (cmpl-…, chatcmpl-…), a registry version or alias, or a model "
                   "directory")
    p.add_argument("--json", action="store_true", help="the chain as JSON")
    p.add_argument("--verify", action="store_true", help="recompute every hash on the way; exit 1 on a difference")
    p.add_argument("--config", "-c", help="YAML preset (where the registry and the response logs are)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    p.add_argument("--verbose", "-v", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_lineage)
