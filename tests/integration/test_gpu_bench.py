"""`jobs/bench/gpu.py --small`: every lever of the GPU benchmark runs on CPU through the real DeepSpeed engine
(lm.train.engine, lm.train.levers), the levers that change how a step is computed leave the loss curve where it
was, and the GPU-only ones are skipped with their reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
GPT2 = ["gpt2-auto", "gpt2-chunked-b64", "small-compiled"]  # ZeRO-1, the chunked loss, torch.compile
ONE_B = ["1b-zero3-ckpt", "1b-zero1-chunked"]  # ZeRO-3 + every block recomputed against ZeRO-1, none, chunked


def test_every_lever_runs_on_cpu_and_leaves_the_loss_curve(tmp_path):
    variants = [*GPT2, *ONE_B, "gpt2-liger-cudagraphs"]
    done = subprocess.run(
        [sys.executable, "jobs/bench/gpu.py", "--small", "--steps", "2", "--out-dir", str(tmp_path),
         "--variants", ",".join(variants), "train.batch_size=4", "train.warmup_steps=1", "train.lr=0.003"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["variant"]: r for r in json.loads((tmp_path / "gpu.json").read_text())["results"]}
    assert results["gpt2-liger-cudagraphs"]["skipped"] == "GPU only: liger (Triton), CUDA graphs"
    for group in (GPT2, ONE_B):
        reference = results[group[0]]["losses"]
        assert reference[-1] < reference[0] - 1  # it learns (the same batch, again and again)
        for name in group[1:]:
            assert "failed" not in results[name], results[name]
            curve = results[name]["losses"]
            assert len(curve) == len(reference)
            assert all(abs(a - b) < 0.01 * a for a, b in zip(curve, reference, strict=True)), (name, curve, reference)
    assert results["1b-zero3-ckpt"]["recomputed_blocks"] == 2 and results["1b-zero1-chunked"]["recomputed_blocks"] == 0
    assert results["gpt2-chunked-b64"]["loss_kernel"] == "chunked" and results["small-compiled"]["compile"]
    assert "| gpt2-liger-cudagraphs | GPU only" in (tmp_path / "table.md").read_text()
