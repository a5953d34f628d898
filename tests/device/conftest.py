"""Tests that run the library on an accelerator and compare it with the CPU.

They are collected only where the target device exists: ``PATCHAUG_TEST_DEVICE``
(default ``cuda``). On a machine without a GPU nothing here is collected, so
nothing is skipped either; ``PATCHAUG_TEST_DEVICE=cpu`` runs the same code paths
against the CPU itself (a check of the tests, not of a device).

Run on a GPU machine with ``python -m pytest tests/device``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("PATCHAUG_TEST_DEVICE", "cuda")


def _available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    backend = getattr(torch.backends, kind, None)
    return bool(backend is not None and backend.is_available())


collect_ignore_glob = [] if _available(DEVICE) else ["test_*.py"]


@pytest.fixture
def device() -> torch.device:
    """The accelerator under test."""
    return torch.device(DEVICE)
