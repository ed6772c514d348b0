"""rms_norm: Triton kernel vs the eager Llama-casting reference (functional.rms_norm)."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, NORM_TOL, assert_close, run_eager, run_kernel
from _parity import ALL, HALF, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

SHAPES = [(1, 1, 3200), (2, 17, 200), (1, 97, 576), (3, 5, 1000), (1, 3, 12800), (1, 1025, 64), (7, 33)]

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _inputs(shape, dtype, device, wdtype=None):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    w = 1 + 0.5 * torch.randn(shape[-1], dtype=wdtype or dtype, device=device)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference(shape, dtype, device):
    x, w = _inputs(shape, dtype, device)
    out = run_kernel(ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rms_norm_fp32_weight_promotes_like_reference(dtype, device):
    # weight * h.to(x.dtype) with an fp32 weight gives an fp32 result in the reference: so must the kernel
    x, w = _inputs((2, 9, 200), dtype, device, wdtype=torch.float32)
    out = run_kernel(ops.rms_norm, x, w, 1e-5)
    ref = F.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    assert_close(out, ref, **NORM_TOL[dtype])


def test_rms_norm_llama_rounding_is_reproduced(device):
    # bf16: the reference rounds x*rstd to bf16 before the weight multiply. A kernel that skips that rounding
    # differs from it by more than the tolerance on a noticeable fraction of elements; ours matches exactly in
    # nearly all of them.
    x, w = _inputs((4, 64, 200), torch.bfloat16, device)
    out = run_kernel(ops.rms_norm, x, w, 1e-6)
    ref = F.rms_norm(x, w, 1e-6)
    one_round = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).bfloat16()
    assert (out != ref).float().mean() < 0.01
    assert (one_round != ref).float().mean() > 0.05  # the test can tell the two roundings apart


def test_rms_norm_non_contiguous_input(device):
    base = torch.randn(5, 400, device=device)
    x = base[:, ::2]  # channel stride 2
    w = torch.randn(200, device=device)
    out = run_kernel(ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[torch.float32])
    xt = torch.randn(200, 6, device=device).t()  # rows strided
    assert_close(run_kernel(ops.rms_norm, xt, w, 1e-6), F.rms_norm(xt, w, 1e-6), **NORM_TOL[torch.float32])


def test_rms_norm_eager_backend_is_the_reference(device):
    x, w = _inputs((2, 17, 200), torch.bfloat16, device)
    assert torch.equal(run_eager(ops.rms_norm, x, w, 1e-6), F.rms_norm(x, w, 1e-6))


def test_rms_norm_bad_inputs(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(TypeError, match="dtype"):
        ops.rms_norm(x.to(torch.int32), torch.ones(8, device=device))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.ones(9, device=device))
    with pytest.raises(ValueError, match="meta"):
        ops.rms_norm(x, torch.ones(8, device="meta"))
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, torch.ones(8, device=device), -1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("hidden", [3200, 12800, 5120, 6144, 7168])
def test_rms_norm_full_shapes(hidden, dtype, device):
    x, w = _inputs((13, 1025, hidden), dtype, device)
    out = run_kernel(ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


NORM_SHAPES = [(1, 1, 3200), (2, 17, 3200), (1, 97, 12800), (3, 5, 576), (2, 7, 1001), (1, 3, 5001), (1, 2, 40000)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm(gpu_backend, shape, dtype):
    x = rnd(*shape, dtype=dtype, scale=3.0)
    w = rnd(shape[-1], dtype=dtype)
    out = parity_run(gpu_backend, "rms_norm", ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_rms_norm_misaligned_rows(gpu_backend, dtype):
    """Rows that start off a 16-byte boundary (a [.., 3201] buffer sliced to 3200): the narrower vector paths."""
    base = rnd(4, 9, 3201, dtype=dtype)
    x = base[..., 1:]
    w = rnd(3200, dtype=dtype)
    out = parity_run(gpu_backend, "rms_norm", ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


@pytest.mark.gpu
def test_mixed_dtype_norm_routes_to_triton(gpu_backend):
    """fp32 weight with bf16 x promotes to an fp32 output: the CUDA wrapper routes it to Triton."""
    x = rnd(2, 5, 3200, dtype=torch.bfloat16)
    w = rnd(3200, dtype=torch.float32)
    out = parity_run(gpu_backend, "rms_norm", ops.rms_norm, x, w, 1e-6, expect="triton")
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[torch.float32])
