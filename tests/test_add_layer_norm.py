"""add_layer_norm: the block's ``residual + x * scale`` fused with the next LayerNorm (backends: triton, cuda;
eager is the reference)."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, NORM_TOL, assert_close, assert_no_nan, run_eager, run_kernel
from _parity import ALL, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

SHAPES = [(1, 1, 3200), (2, 17, 200), (1, 97, 576), (2, 5, 1000), (1, 2, 12800), (1, 1025, 64)]

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(shape, dtype, device, with_scale=True):
    x = torch.randn(shape, dtype=dtype, device=device)
    res = torch.randn(shape, dtype=dtype, device=device) * 4
    w = 1 + 0.3 * torch.randn(shape[-1], dtype=dtype, device=device)
    b = torch.randn(shape[-1], dtype=dtype, device=device)
    s = 0.1 * (1 + 0.3 * torch.randn(shape[-1], dtype=dtype, device=device)) if with_scale else None
    return x, res, w, b, s


@pytest.mark.parametrize("with_scale", [True, False], ids=["ls", "no_ls"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_add_layer_norm_matches_reference(shape, dtype, with_scale, device):
    x, res, w, b, s = _inputs(shape, dtype, device, with_scale)
    new_res, normed = run_kernel(ops.add_layer_norm, x, res, w, b, 1e-6, s)
    ref_res, ref_normed = F.add_layer_norm(x, res, w, b, 1e-6, s)
    assert_no_nan(new_res, "new_residual")
    assert torch.equal(new_res, ref_res)
    assert_close(normed, ref_normed, **NORM_TOL[dtype], what="normed")


def test_add_layer_norm_eager_backend_is_the_reference(device):
    x, res, w, b, s = _inputs((2, 17, 200), torch.bfloat16, device)
    for got, ref in zip(run_eager(ops.add_layer_norm, x, res, w, b, 1e-6, s), F.add_layer_norm(x, res, w, b, 1e-6, s)):
        assert torch.equal(got, ref)


def test_add_layer_norm_bad_inputs(device):
    x, res, w, b, s = _inputs((2, 5, 16), torch.float32, device)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.add_layer_norm(x, res, w, b, 1e-6, s[:3])
    with pytest.raises(ValueError, match="residual has shape"):
        ops.add_layer_norm(x, res[:, :4], w, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_add_layer_norm_full_shapes(dtype, device):
    x, res, w, b, s = _inputs((13, 1025, 3200), dtype, device)
    got, ref = run_kernel(ops.add_layer_norm, x, res, w, b, 1e-6, s), F.add_layer_norm(x, res, w, b, 1e-6, s)
    assert torch.equal(got[0], ref[0])
    assert_close(got[1], ref[1], **NORM_TOL[dtype])


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", [(2, 17, 3200), (1, 1025, 3200), (2, 7, 1001), (1, 3, 5001)], ids=str)
@pytest.mark.parametrize("with_scale", [True, False])
def test_add_layer_norm_parity(gpu_backend, shape, dtype, with_scale):
    x, res = rnd(*shape, dtype=dtype), rnd(*shape, dtype=dtype, scale=4.0)
    w = rnd(shape[-1], dtype=dtype)
    b = rnd(shape[-1], dtype=dtype)
    s = rnd(shape[-1], dtype=dtype, scale=0.1) if with_scale else None
    new_res, y = parity_run(gpu_backend, "add_layer_norm", ops.add_layer_norm, x, res, w, b, 1e-6, s)
    ref_res, ref_y = F.add_layer_norm(x, res, w, b, 1e-6, s)
    assert_no_nan(new_res, "new_residual")
    # the residual update is elementwise with eager's rounding: bit-exact
    assert torch.equal(new_res, ref_res), f"new_residual differs: max err {(new_res - ref_res).abs().max().item()}"
    assert_close(y, ref_y, **NORM_TOL[dtype])
