"""lm.train.rng: a checkpoint's RNG state round-trips through safetensors (no pickle)."""

import json
import random
import struct

import numpy as np
import torch

from lm.train.rng import load_rng_state, save_rng_state


def _draws() -> tuple:
    return random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3).tolist()


def test_the_restored_state_gives_the_saved_runs_next_draws(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    random.gauss(0, 1), np.random.randn()  # cached Gaussians are part of the state
    path = tmp_path / "rng-0.safetensors"
    save_rng_state(path)
    expected = _draws()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert _draws() != expected
    load_rng_state(path)
    assert _draws() == expected
    blob = path.read_bytes()  # safetensors: an 8-byte header length, then a JSON header: no pickle opcode
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    assert {"python", "numpy", "torch"} <= set(header) and not blob.startswith(b"\x80")
