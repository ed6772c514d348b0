"""GPU parity rows over backends {triton, cuda}, shared by each op's tests/test_<op>.py.

The rows are GPU-only (``@pytest.mark.gpu``; skipped with a reason on CPU). The ``cuda`` rows need the extension
(``pip install --no-build-isolation -e .``): they skip with the loader's reason when it is missing, unless
``INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1`` (set by scripts/gpu_cuda_check.sh), which turns a missing extension into a
failure. Every call runs with NaN-poisoned outputs and asserts that the requested backend really launched (for
``cuda``: the extension's kernel, not a fallback), so no row can pass by running something else.
"""
from __future__ import annotations

import os

import pytest
import torch

from internvl_kernels import _backend, ops, set_backend
from internvl_kernels.ops import _common

GPU_BACKENDS = ("triton", "cuda")
HALF = (torch.float16, torch.bfloat16)
ALL = (torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEV = "cuda"


def require_cuda_ext():
    """Skip (or fail under INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1) with the loader's reason when the extension is absent."""
    from internvl_kernels.ops import _cuda

    if not _cuda.available():
        msg = _cuda.status()
        if os.environ.get("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "0") not in ("", "0"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request):
    """A GPU parity row's backend: ``triton`` or ``cuda`` (the latter needs the extension)."""
    if request.param == "cuda":
        require_cuda_ext()
    return request.param


def parity_run(backend, op, fn, *args, expect=None, **kwargs):
    """``fn(*args)`` under ``backend`` with poisoned outputs; asserts which implementation launched.

    ``expect``: "cuda" / "triton" (default: the backend itself) -- "triton" for the cases the CUDA implementation
    hands on (its ``can_implement`` says no). A CUDA launch is counted as ``cuda:<op>``; Triton wrappers count their
    own kernels (any name).
    """
    expect = expect or backend
    cuda_before, all_before = _common.launches("cuda:" + op), _common.launches()
    with set_backend(backend), ops.poison_outputs(float("nan")):
        out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    cuda_launched = _common.launches("cuda:" + op) - cuda_before
    other_launched = _common.launches() - all_before - cuda_launched
    if expect == "cuda":
        assert cuda_launched > 0, f"{op}: the CUDA kernel did not run under backend {backend!r}"
        assert _backend.resolve(op, torch.device(DEV)) == "cuda"
    else:
        assert cuda_launched == 0, f"{op}: the CUDA kernel ran but this case should be routed to Triton"
        assert other_launched > 0, f"{op}: no Triton launch under backend {backend!r}"
    return out


def rnd(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device=DEV, dtype=dtype) * scale
