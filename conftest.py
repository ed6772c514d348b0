"""Shared by tests/ and bench/.

Without a CUDA device the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must be set before triton
is imported anywhere, so it is set here, before any test module (and so the package) is imported.
Items marked ``@pytest.mark.gpu`` are skipped with a reason when no CUDA device is present.
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
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (none present): full-shape parity / GPU benchmark row")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
