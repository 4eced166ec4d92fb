"""A training process's random-number state (Python, NumPy, torch, CUDA) in a checkpoint, without pickle.

Checkpoint storage is read back on resume; a pickle read from it would run whatever code was put there.
The state goes into a safetensors file instead: the generators' words as integer tensors, the few scalars
(versions, positions, a cached Gaussian) as JSON metadata. Reading it parses numbers, never code.

    save_rng_state(folder / "rng-0.safetensors")
    load_rng_state(folder / "rng-0.safetensors")   # the next draws are the ones the saved run would make
    seed_rank(seed, rank, step)                    # a rank with no saved state (a fresh run, a new rank)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file


def save_rng_state(path: Path) -> None:
    """Write this process's RNG states to ``path`` (safetensors)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(words, dtype=torch.int64),  # 625 words < 2**32
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    meta = {"python": json.dumps([version, gauss]),
            "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng_state(path: Path) -> None:
    """Restore the RNG states :func:`save_rng_state` wrote (CUDA's only where this process has GPUs)."""
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    version, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def seed_rank(seed: int, rank: int, step: int) -> None:
    """Seed Python, NumPy and torch (CUDA too) of a rank that has no saved RNG state: from (``seed``, ``rank``,
    ``step``) through NumPy's SeedSequence, so ranks draw different streams (dropout) and a rank that starts at
    ``step`` (0 for a fresh run, a resume's step for a rank beyond the checkpoint's count) draws the same ones
    every time it does."""
    value = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
