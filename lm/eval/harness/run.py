"""lm-evaluation-harness (``lm_eval.simple_evaluate``) on a model directory or a running lmforge endpoint.

* model directory (local or in object storage, downloaded to a temporary folder): the harness's Hugging
  Face backend (``model="hf"``) reads it as the Llama directory it is, in float32;
* endpoint (``http://host:port/v1``): ``local-completions`` on ``<endpoint>/completions``, token-id prompts
  (``tokenized_requests``) made with the model directory's tokenizer (``tokenizer_backend=huggingface``):
  log-likelihood tasks need completions with ``echo`` and ``logprobs`` (``local-chat-completions`` cannot
  score them). The API key is the first of ``$LMFORGE_API_KEYS`` (serve.api_keys_env), else
  ``$OPENAI_API_KEY``; the model name is ``serve.model_name``.

Runs are offline (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``): the shipped tasks read data built now
from held-out speeches (lm.eval.harness.data), in a temporary folder with the task YAMLs. With
``eval.harness.check`` every request is scored again by lmforge's own Transformer
(lm.eval.likelihood.loglikelihoods) and the largest difference reported.

    run = run_harness(cfg, store, model_uri, ["lmforge_cloze"])                  # HarnessRun
    run = run_harness(cfg, store, model_uri, ["lmforge_cloze"], endpoint="http://127.0.0.1:8000/v1")
    run.tasks["lmforge_cloze"]["acc"], run.requests[0].loglikelihood, run.check.max_abs_diff
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from lm.config import Config, ConfigError
from lm.data.sources import DataError
from lm.environ import environment
from lm.eval.harness.data import (
    CLOZE,
    TASKS,
    WHO_SPEAKS,
    cloze_items,
    speaker_items,
    speaker_pool,
    write_tasks,
)
from lm.eval.sets import speeches
from lm.progress import Log
from lm.storage import ObjectStore
from lm.tokenizer import BPETokenizer


class HarnessRequest(BaseModel):
    """One log-likelihood request of the harness and its answer (the harness's ``resps``)."""

    task: str
    doc_id: int
    context: str
    continuation: str
    loglikelihood: float
    is_greedy: bool


class HarnessCheck(BaseModel):
    """The same requests scored by lmforge's Transformer (lm.eval.likelihood) from the model directory."""

    requests: int
    max_abs_diff: float  # nats, over every request
    greedy_disagreements: int


class HarnessRun(BaseModel):
    """What one harness run measured: per task its metrics (``acc``, ``acc_stderr``, …) and items."""

    backend: Literal["hf", "local-completions"]
    target: str  # the model directory, or the endpoint
    tokenizer: str  # the model directory whose tokenizer made the requests
    tasks: dict[str, dict[str, float]]
    items: dict[str, int]
    check: HarnessCheck | None = None
    lm_eval_version: str
    seconds: float
    requests: list[HarnessRequest] = []

    def report_entry(self) -> dict:
        """The report's ``harness`` section (the requests go to their own file)."""
        return self.model_dump(exclude={"requests"})


def offline():
    """Nothing may download: the harness's datasets and hub clients run offline (the variables are set
    while the block runs, then restored; the libraries first imported inside keep their offline mode)."""
    return environment(dict.fromkeys(("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"), "1"))


def local_model_dir(store: ObjectStore, uri: str, tmp: Path) -> Path:
    """The model directory as a local folder (downloaded into ``tmp`` when it is in object storage)."""
    if not store.is_published(uri):
        raise DataError(f"{uri}: no published model directory there (missing or incomplete)")
    if (local := store.local_path(uri)) is not None:
        return Path(local)
    tmp.mkdir(parents=True, exist_ok=True)
    store.download_dir(uri, str(tmp))
    return tmp


def build_tasks(store: ObjectStore, cfg: Config, tok: BPETokenizer, budget: int, tasks: list[str],
                folder: Path) -> Path:
    """The data and YAMLs of the shipped tasks among ``tasks`` in ``folder`` (the harness's include path)."""
    h = cfg.eval.harness
    every = speeches(store, cfg)
    held_out = [(speaker, text) for speaker, text, held in every if held]
    items = {}
    if CLOZE in tasks:
        items[CLOZE] = cloze_items(held_out, tok, budget, h.limit)
    if WHO_SPEAKS in tasks:
        pool = speaker_pool([speaker for speaker, _, _ in every])
        items[WHO_SPEAKS] = speaker_items(held_out, pool, tok, budget, h.limit, h.seed)
    return write_tasks(folder, items)


def api_key(cfg: Config) -> str:
    """The first key of ``$<serve.api_keys_env>``, else ``$OPENAI_API_KEY`` (empty: none)."""
    keys = [k.strip() for k in os.environ.get(cfg.serve.api_keys_env, "").split(",") if k.strip()]
    return keys[0] if keys else os.environ.get("OPENAI_API_KEY", "")


def check_endpoint(cfg: Config, endpoint: str) -> None:
    """DataError unless ``endpoint`` answers ``/models`` with ``serve.model_name`` among its models."""
    request = urllib.request.Request(endpoint.rstrip("/") + "/models",
                                     headers={"Authorization": f"Bearer {api_key(cfg)}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            ids = [m.get("id") for m in json.load(answer).get("data", [])]
    except (OSError, ValueError, AttributeError) as err:  # refused, HTTP errors, not an OpenAI-style answer
        raise DataError(f"endpoint {endpoint}: no OpenAI-style /models answer ({err})") from None
    if cfg.serve.model_name not in ids:
        raise DataError(f"endpoint {endpoint} serves {ids}, not {cfg.serve.model_name!r} (serve.model_name)")


def model_args(cfg: Config, local: Path, max_len: int, endpoint: str | None) -> tuple[str, dict]:
    """The harness model and its arguments: the HF backend on ``local``, or local-completions on ``endpoint``."""
    if endpoint is None:
        return "hf", {"pretrained": str(local), "dtype": "float32", "max_length": max_len}
    return "local-completions", {
        "model": cfg.serve.model_name, "base_url": endpoint.rstrip("/") + "/completions", "tokenizer": str(local),
        "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": max_len,
        "num_concurrent": 1, "max_retries": 2, "header": {"Authorization": f"Bearer {api_key(cfg)}"},
    }


def _metrics(results: dict) -> dict[str, float]:
    """``{"acc": …, "acc_stderr": …}`` of one task's results (keys ``"<metric>,<filter>"``)."""
    out = {}
    for key, value in results.items():
        name, sep, _ = key.partition(",")
        if sep and isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _requests(samples: dict[str, list[dict]]) -> list[HarnessRequest]:
    out = []
    for task, rows in samples.items():
        for row in rows:
            for (context, continuation), resp in zip(row["arguments"], row["resps"], strict=True):
                loglik, greedy = resp[0]
                out.append(HarnessRequest(task=task, doc_id=row["doc_id"], context=context,
                                          continuation=continuation, loglikelihood=loglik, is_greedy=greedy))
    return out


def check_requests(local: Path, requests: list[HarnessRequest], batch_size: int) -> HarnessCheck:
    """Score ``requests`` with lmforge's Transformer from the model directory ``local`` and compare."""
    import torch

    from lm.eval.likelihood import loglikelihoods
    from lm.modeldir import load_model

    model = load_model(local, dtype=torch.float32)
    ours = loglikelihoods(model, BPETokenizer.load(local / "tokenizer.json"),
                          [(r.context, r.continuation) for r in requests], batch_size)
    diffs = [abs(r.loglikelihood - ll) for r, (ll, _) in zip(requests, ours, strict=True)]
    return HarnessCheck(requests=len(requests), max_abs_diff=max(diffs, default=0.0),
                        greedy_disagreements=sum(r.is_greedy != g for r, (_, g) in zip(requests, ours, strict=True)))


def _evaluate(model: str, args: dict, tasks: list[str], include: Path, batch_size: int) -> dict:
    import torch

    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ConfigError(f"harness tasks need lm-evaluation-harness ({err}): pip install -e '.[harness]'") from None

    manager = TaskManager(include_path=str(include), include_defaults=not set(tasks) <= set(TASKS))
    if unknown := [t for t in tasks if t not in manager.all_tasks]:
        raise DataError(f"unknown lm-evaluation-harness tasks {unknown}; lmforge ships {list(TASKS)}")
    device = "cuda" if torch.cuda.is_available() and model == "hf" else "cpu"
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager,
                                   batch_size=batch_size, device=device, log_samples=True, bootstrap_iters=100)


def run_harness(cfg: Config, store: ObjectStore, model_uri: str, tasks: list[str], endpoint: str | None = None,
                log: Log = print) -> HarnessRun:
    """Run the harness ``tasks`` on the model directory ``model_uri``, or on ``endpoint`` with that
    directory's tokenizer (see the module doc)."""
    from importlib.metadata import version

    from lm.modeldir import config_from_hf

    h, start = cfg.eval.harness, time.perf_counter()
    if endpoint:
        check_endpoint(cfg, endpoint)
    with offline(), tempfile.TemporaryDirectory(prefix="lm-harness-") as tmp:
        local = local_model_dir(store, model_uri, Path(tmp) / "model")
        max_len = config_from_hf(json.loads((local / "config.json").read_text())).max_seq_len
        tok = BPETokenizer.load(local / "tokenizer.json")
        include = build_tasks(store, cfg, tok, max_len - 1, tasks, Path(tmp) / "tasks")  # a token for the API's
        model, args = model_args(cfg, local, max_len, endpoint)
        batch = min(h.batch_size, cfg.serve.max_prompts) if endpoint else h.batch_size
        results = _evaluate(model, args, tasks, include, batch)
        requests = _requests(results["samples"])
        check = check_requests(local, requests, h.batch_size) if h.check else None
    tasks_out = {t: _metrics(results["results"][t]) for t in tasks}
    items = {t: len(results["samples"][t]) for t in tasks}
    run = HarnessRun(backend=model, target=endpoint or model_uri, tokenizer=model_uri, tasks=tasks_out, items=items,
                     check=check, lm_eval_version=version("lm_eval"), seconds=round(time.perf_counter() - start, 2),
                     requests=requests)
    for task, metrics in tasks_out.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
        log(f"eval harness {task} ({model}): {items[task]} items, {shown}")
    if check:
        log(f"eval harness: lmforge's Transformer on the same {check.requests} requests: max |Δ log-likelihood| "
            f"{check.max_abs_diff:.2e}, {check.greedy_disagreements} greedy disagreements [{run.seconds:.1f} s]")
    return run
