"""The built extension ``internvl_kernels._C`` itself (no GPU needed): it imports against the running torch, reports
the torch / CUDA versions it was built with, and the loader registers every op of the ``cuda`` backend.

Skipped with a reason where the extension is not built (the CPU CI); ``INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1`` (set by
.ci/cuda_build.sh after the CUDA build) turns that skip into a failure."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from internvl_kernels import _backend
from internvl_kernels.ops import _cuda

REQUIRED = os.environ.get("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "0").strip() not in ("", "0")


@pytest.fixture(scope="module")
def ext():
    if importlib.util.find_spec("internvl_kernels._C") is None:
        if REQUIRED:
            pytest.fail("INTERNVL_KERNELS_REQUIRE_CUDA_EXT is set but internvl_kernels._C is not built")
        pytest.skip("internvl_kernels._C is not built (CPU-only install)")
    from internvl_kernels import _C

    return _C


def test_build_info_matches_the_running_torch(ext):
    info = _cuda._parse_build_info(ext.build_info())
    assert torch.version.cuda is not None, "the extension is built but torch has no CUDA"
    assert info.get("torch") == torch.__version__.split("+")[0], (info, torch.__version__)
    assert info.get("cuda", "").split(".")[:2] == torch.version.cuda.split(".")[:2], (info, torch.version.cuda)


def test_loader_registers_every_op(ext, monkeypatch):
    if os.environ.get("INTERNVL_KERNELS_NO_CUDA", "0").strip() not in ("", "0"):
        pytest.fail("INTERNVL_KERNELS_NO_CUDA is set: the built extension is not loaded")
    loaded, why = _cuda._load()
    assert why is None and loaded is ext, why
    # load + register again, as at import (other tests may have left the loader's globals in a fake state)
    for name in ("_ext", "_error", "_registered"):
        monkeypatch.setattr(_cuda, name, getattr(_cuda, name))
    for op in _cuda.OPS:
        monkeypatch.setitem(_backend._IMPLS, op, dict(_backend._IMPLS[op]))
    _cuda._init()
    assert _cuda.available(), _cuda.status()
    assert len(_cuda.OPS) == 10 and set(_cuda._registered) == set(_cuda.OPS), _cuda._registered
    ns = torch.ops.internvl_kernels_cuda
    for op in _cuda.OPS:
        assert hasattr(ns, op), f"torch.ops.internvl_kernels_cuda.{op} is not registered"
        assert "cuda" in _backend.available_impls(op), (op, _backend.available_impls(op))
    assert "internvl_kernels._C" in _cuda.status()
