"""pixel_shuffle / pixel_shuffle_layer_norm (ops; backends triton, cuda) vs functional.pixel_shuffle(+layer_norm),
v1 and v2. pixel_shuffle_layer_norm shares the pixel_shuffle files (ops, csrc, tests, bench)."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, NORM_TOL, assert_close, assert_no_nan, run_eager, run_kernel
from _parity import ALL, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# (batch, grid side, channels)
GRIDS = [(1, 2, 8), (2, 8, 200), (1, 6, 3), (2, 4, 3200)]
REAL_GRID = (1, 32, 24)  # InternViT's 32 x 32 patch grid (448 px tile), small channels: one program per token

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,side,C", GRIDS, ids=str)
def test_pixel_shuffle_is_exact(B, side, C, dtype, version, device):
    x = torch.randn(B, side * side, C, dtype=dtype, device=device)
    out = run_kernel(ops.pixel_shuffle, x, 0.5, version)
    ref = F.pixel_shuffle(x, 0.5, version)
    assert_no_nan(out)
    assert out.shape == ref.shape and torch.equal(out, ref)  # a pure gather: bit-identical


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_real_grid(version, device):
    B, side, C = REAL_GRID
    x = torch.randn(B, side * side, C, dtype=torch.bfloat16, device=device)
    assert torch.equal(run_kernel(ops.pixel_shuffle, x, 0.5, version), F.pixel_shuffle(x, 0.5, version))
    w, b = torch.randn(4 * C, dtype=x.dtype, device=device), torch.randn(4 * C, dtype=x.dtype, device=device)
    out = run_kernel(ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[x.dtype])


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("scale_factor", [1 / 3, 0.25, 1.0])
def test_pixel_shuffle_other_ratios(scale_factor, version, device):
    side = 12
    x = torch.randn(2, side * side, 5, device=device)
    out = run_kernel(ops.pixel_shuffle, x, scale_factor, version)
    assert torch.equal(out, F.pixel_shuffle(x, scale_factor, version))


def test_pixel_shuffle_versions_differ(device):
    x = torch.randn(1, 64, 4, device=device)
    assert not torch.equal(run_kernel(ops.pixel_shuffle, x, 0.5, "v1"), run_kernel(ops.pixel_shuffle, x, 0.5, "v2"))


def test_pixel_shuffle_strided_input(device):
    # ViT output without the cls token: a view starting one row in
    tokens = torch.randn(2, 1 + 64, 24, device=device)
    x = tokens[:, 1:, :]
    assert torch.equal(run_kernel(ops.pixel_shuffle, x, 0.5, "v2"), F.pixel_shuffle(x, 0.5, "v2"))


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,side,C", GRIDS, ids=str)
def test_pixel_shuffle_layer_norm(B, side, C, dtype, version, device):
    x = torch.randn(B, side * side, C, dtype=dtype, device=device) * 2 + 1
    w = 1 + 0.3 * torch.randn(4 * C, dtype=dtype, device=device)
    b = torch.randn(4 * C, dtype=dtype, device=device)
    out = run_kernel(ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])


def test_pixel_shuffle_layer_norm_no_affine_and_ratio_3(device):
    x = torch.randn(1, 81, 7, device=device)[:, :, :]
    out = run_kernel(ops.pixel_shuffle_layer_norm, x, None, None, 1 / 3, "v1", 1e-5)
    ref = F.layer_norm(F.pixel_shuffle(x, 1 / 3, "v1"), None, None, 1e-5)
    assert_close(out, ref, **NORM_TOL[torch.float32])


def test_pixel_shuffle_eager_backend_is_the_reference(device):
    x = torch.randn(2, 16, 8, device=device, dtype=torch.bfloat16)
    w, b = torch.randn(32, device=device, dtype=torch.bfloat16), torch.randn(32, device=device, dtype=torch.bfloat16)
    assert torch.equal(run_eager(ops.pixel_shuffle, x, 0.5, "v1"), F.pixel_shuffle(x, 0.5, "v1"))
    assert torch.equal(run_eager(ops.pixel_shuffle_layer_norm, x, w, b, 0.5, "v1"),
                       F.pixel_shuffle_layer_norm(x, w, b, 0.5, "v1"))


def test_pixel_shuffle_bad_inputs(device):
    x = torch.randn(1, 16, 4, device=device)
    with pytest.raises(ValueError, match="square grid"):
        ops.pixel_shuffle(torch.randn(1, 17, 4, device=device))
    with pytest.raises(ValueError, match="not divisible"):
        ops.pixel_shuffle(torch.randn(1, 9, 4, device=device))
    with pytest.raises(ValueError, match="version"):
        ops.pixel_shuffle(x, 0.5, "v3")
    with pytest.raises(ValueError, match="integer"):
        ops.pixel_shuffle(x, 0.4)
    with pytest.raises(ValueError, match="rank 3"):
        ops.pixel_shuffle(x[0])
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.pixel_shuffle_layer_norm(x, torch.ones(4, device=device), None)


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_pixel_shuffle_full_shapes(dtype, version, device):
    x = torch.randn(13, 1024, 3200, dtype=dtype, device=device)
    assert torch.equal(run_kernel(ops.pixel_shuffle, x, 0.5, version), F.pixel_shuffle(x, 0.5, version))
    w, b = torch.randn(12800, dtype=dtype, device=device), torch.randn(12800, dtype=dtype, device=device)
    assert_close(run_kernel(ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5),
                 F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C,sf", [(13, 1024, 3200, 0.5), (2, 16, 5, 0.5), (1, 36, 7, 1 / 3), (3, 64, 1024, 0.5)])
def test_pixel_shuffle(gpu_backend, B, N, C, sf, version, dtype):
    x = rnd(B, N, C, dtype=dtype)
    out = parity_run(gpu_backend, "pixel_shuffle", ops.pixel_shuffle, x, sf, version)
    assert torch.equal(out, F.pixel_shuffle(x, sf, version)), "pixel_shuffle is a pure copy: must be bit-exact"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C", [(13, 1024, 3200), (2, 16, 5), (1, 64, 1024)])
def test_pixel_shuffle_layer_norm(gpu_backend, B, N, C, version, dtype):
    x = rnd(B, N, C, dtype=dtype, scale=2.0)
    w, b = rnd(4 * C, dtype=dtype), rnd(4 * C, dtype=dtype)
    out = parity_run(gpu_backend, "pixel_shuffle_layer_norm", ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C", [(13, 1024, 3200), (2, 16, 8)])
def test_pixel_shuffle_strided_cls_view(gpu_backend, B, N, C, version, dtype):
    """The model's input: ``vit_embeds[:, 1:, :]`` (cls dropped), a strided view read in place."""
    full = rnd(B, N + 1, C, dtype=dtype, scale=2.0)
    x = full[:, 1:, :]
    assert not x.is_contiguous()
    w, b = rnd(4 * C, dtype=dtype), rnd(4 * C, dtype=dtype)
    out = parity_run(gpu_backend, "pixel_shuffle_layer_norm", ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])
    out = parity_run(gpu_backend, "pixel_shuffle", ops.pixel_shuffle, x, 0.5, version)
    assert torch.equal(out, F.pixel_shuffle(x, 0.5, version))
