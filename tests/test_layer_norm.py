"""layer_norm: Triton kernel vs F.layer_norm (functional.layer_norm)."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, NORM_TOL, assert_close, run_eager, run_kernel
from _parity import ALL, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

SHAPES = [(1, 1, 3200), (2, 17, 200), (1, 97, 576), (3, 5, 1000), (1, 3, 12800), (1, 1025, 64), (7, 33)]

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(shape, dtype, device):
    # a large common offset: a one-pass E[x²]-E[x]² variance would lose the precision the reference keeps
    x = torch.randn(shape, dtype=dtype, device=device) * 2 + 3
    w = 1 + 0.5 * torch.randn(shape[-1], dtype=dtype, device=device)
    b = torch.randn(shape[-1], dtype=dtype, device=device)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layer_norm_matches_reference(shape, dtype, device):
    x, w, b = _inputs(shape, dtype, device)
    out = run_kernel(ops.layer_norm, x, w, b, 1e-6)
    assert_close(out, F.layer_norm(x, w, b, 1e-6), **NORM_TOL[dtype])


@pytest.mark.parametrize("affine", ["none", "weight_only", "bias_only"])
def test_layer_norm_optional_affine(affine, device):
    x, w, b = _inputs((3, 11, 300), torch.float32, device)
    w = None if affine in ("none", "bias_only") else w
    b = None if affine in ("none", "weight_only") else b
    out = run_kernel(ops.layer_norm, x, w, b, 1e-5)
    assert_close(out, F.layer_norm(x, w, b, 1e-5), **NORM_TOL[torch.float32])


def test_layer_norm_fp32_params_bf16_input(device):
    x, _, _ = _inputs((2, 9, 200), torch.bfloat16, device)
    w, b = torch.randn(200, device=device), torch.randn(200, device=device)
    out = run_kernel(ops.layer_norm, x, w, b, 1e-5)
    assert out.dtype == torch.bfloat16
    assert_close(out, F.layer_norm(x, w, b, 1e-5), **NORM_TOL[torch.bfloat16])


def test_layer_norm_eager_backend_is_the_reference(device):
    x, w, b = _inputs((2, 17, 200), torch.float16, device)
    assert torch.equal(run_eager(ops.layer_norm, x, w, b, 1e-6), F.layer_norm(x, w, b, 1e-6))


def test_layer_norm_bad_inputs(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.layer_norm(x, None, torch.ones(7, device=device))
    with pytest.raises(TypeError, match="dtype"):
        ops.layer_norm(x.to(torch.float64), None, None)
    with pytest.raises(ValueError, match="rank"):
        ops.layer_norm(torch.randn((), device=device), None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [1024, 3200, 12800])
def test_layer_norm_full_shapes(hidden, dtype, device):
    x, w, b = _inputs((13, 1025, hidden), dtype, device)
    assert_close(run_kernel(ops.layer_norm, x, w, b, 1e-6), F.layer_norm(x, w, b, 1e-6), **NORM_TOL[dtype])


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


NORM_SHAPES = [(1, 1, 3200), (2, 17, 3200), (1, 97, 12800), (3, 5, 576), (2, 7, 1001), (1, 3, 5001), (1, 2, 40000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm(gpu_backend, shape, dtype, affine):
    x = rnd(*shape, dtype=dtype, scale=2.0) + 0.5
    w = rnd(shape[-1], dtype=dtype) if affine != "none" else None
    b = rnd(shape[-1], dtype=dtype) if affine == "wb" else None
    out = parity_run(gpu_backend, "layer_norm", ops.layer_norm, x, w, b, 1e-6)
    assert_close(out, F.layer_norm(x, w, b, 1e-6), **NORM_TOL[dtype])
