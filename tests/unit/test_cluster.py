"""lm.cluster: the environment Ray workers get (no Ray started)."""

from __future__ import annotations

import pytest
import torch

from lm.cluster import accelerator, worker_env


@pytest.mark.parametrize(("cuda", "expected"), [(True, "cuda"), (False, "cpu")])
def test_workers_get_the_accelerator_of_the_device_found(monkeypatch, cuda, expected):
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert accelerator() == expected
    assert worker_env()["DS_ACCELERATOR"] == expected


def test_an_explicit_accelerator_is_kept(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_env()["DS_ACCELERATOR"] == "cpu"
