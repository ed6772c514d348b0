"""Test configuration.

Without a CUDA device the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before triton
is imported anywhere, so it is set here, at collection start, before the package is imported.
GPU-only tests carry ``@pytest.mark.gpu`` and are skipped with a reason when no CUDA device is present.
"""
from __future__ import annotations

import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present); runs in the GPU parity suite")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device the parity tests run on: CUDA when present, else CPU (Triton under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
