"""Test fixtures. ``TRITON_INTERPRET`` and the GPU-only skip live in the root ``conftest.py``."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture
def device():
    """The device the parity tests run on: CUDA when present, else CPU (Triton under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
