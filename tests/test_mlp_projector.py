"""mlp_projector (LN → Linear → GELU → Linear); the linear op it is built from is tests/test_linear.py."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, NORM_TOL, assert_close, assert_flash_rule, run_eager, run_kernel
from _parity import ALL, IDS, gpu_backend, parity_run, require_cuda_ext, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _proj_inputs(B, N, K, H, dtype, device, H2=None):
    H2 = H2 or H
    x = torch.randn(B, N, K, dtype=dtype, device=device) * 2 + 0.5
    lw = 1 + 0.2 * torch.randn(K, dtype=dtype, device=device)
    lb = 0.1 * torch.randn(K, dtype=dtype, device=device)
    w1 = torch.randn(H, K, dtype=dtype, device=device) * K ** -0.5
    b1 = 0.1 * torch.randn(H, dtype=dtype, device=device)
    w2 = torch.randn(H2, H, dtype=dtype, device=device) * H ** -0.5
    b2 = 0.1 * torch.randn(H2, dtype=dtype, device=device)
    return x, lw, lb, w1, b1, w2, b2


# ------------------------------------------------------------------------------------------------ mlp_projector
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,N,K,H,H2", [(1, 16, 256, 96, 96), (2, 17, 200, 70, 50), (1, 1, 512, 64, 64)], ids=str)
def test_mlp_projector(B, N, K, H, H2, dtype, device):
    args = _proj_inputs(B, N, K, H, dtype, device, H2)
    out = run_kernel(ops.mlp_projector, *args, 1e-5, min_launches=3)  # LN + 2 GEMMs
    ref64 = F.mlp_projector(*(a.double() for a in args), 1e-5)
    assert_flash_rule(out, F.mlp_projector(*args, 1e-5), ref64, dtype)


def test_projector_gemms_after_pixel_shuffle_layer_norm(device):
    # the patched model's projector path: fused shuffle+LN, then the two epilogue GEMMs == mlp1(pixel_shuffle(x))
    vit = torch.randn(2, 64, 32, device=device)
    _, lw, lb, w1, b1, w2, b2 = _proj_inputs(1, 1, 128, 48, torch.float32, device)

    def path(v):
        h = ops.pixel_shuffle_layer_norm(v, lw, lb, 0.5, "v1", 1e-5)
        return ops.projector_gemms(h, w1, b1, w2, b2)

    out = run_kernel(path, vit, min_launches=3)
    ref = F.mlp_projector(F.pixel_shuffle(vit, 0.5, "v1"), lw, lb, w1, b1, w2, b2, 1e-5)
    ref64 = F.mlp_projector(F.pixel_shuffle(vit.double(), 0.5, "v1"), lw.double(), lb.double(), w1.double(),
                            b1.double(), w2.double(), b2.double(), 1e-5)
    assert_flash_rule(out, ref, ref64, torch.float32)


def test_mlp_projector_eager_backend_is_the_reference(device):
    args = _proj_inputs(1, 5, 64, 32, torch.bfloat16, device)
    assert torch.equal(run_eager(ops.mlp_projector, *args), F.mlp_projector(*args))


def test_mlp_projector_bad_inputs(device):
    x, lw, lb, w1, b1, w2, b2 = _proj_inputs(1, 4, 64, 32, torch.float32, device)
    with pytest.raises(ValueError, match="w1 is"):
        ops.mlp_projector(x, lw, lb, w1[:, :10], b1, w2, b2)
    with pytest.raises(ValueError, match="w2 is"):
        ops.mlp_projector(x, lw, lb, w1, b1, w2[:, :5], b2)
    with pytest.raises(TypeError, match="b2 has dtype"):
        ops.mlp_projector(x, lw, lb, w1, b1, w2, b2.half())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("B,N,K,H", [(13, 256, 12800, 5120), (1, 256, 12800, 7168), (13, 256, 4096, 6144)], ids=str)
def test_mlp_projector_full_shapes(B, N, K, H, dtype, device):
    args = _proj_inputs(B, N, K, H, dtype, device)
    out = run_kernel(ops.mlp_projector, *args, 1e-5, min_launches=1)  # the GEMMs may go to cuBLAS
    ref64 = F.mlp_projector(*(a.double() for a in args), 1e-5)
    assert_flash_rule(out, F.mlp_projector(*args, 1e-5), ref64, dtype)


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("T,C4,H", [(256, 12800, 5120), (3, 4096, 896), (17, 1000, 512)])
def test_mlp_projector(gpu_backend, T, C4, H, dtype):
    x = rnd(1, T, C4, dtype=dtype)
    lw, lb = 1 + rnd(C4, dtype=dtype, scale=0.1), rnd(C4, dtype=dtype, scale=0.1)
    w1, b1 = rnd(H, C4, dtype=dtype, scale=C4**-0.5), rnd(H, dtype=dtype, scale=0.1)
    w2, b2 = rnd(H, H, dtype=dtype, scale=H**-0.5), rnd(H, dtype=dtype, scale=0.1)
    args = (x, lw, lb, w1, b1, w2, b2, 1e-5)
    out = parity_run(gpu_backend, "mlp_projector", ops.mlp_projector, *args)
    ref64 = F.mlp_projector(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert_flash_rule(out, F.mlp_projector(*args), ref64, dtype, what="mlp_projector", factor=2.0)


@pytest.mark.gpu
def test_bias_gelu_epilogue_direct():
    """The epilogue kernel alone: exact erf GELU of (y + bias) in fp32, rounded once."""
    require_cuda_ext()
    for dtype in ALL:
        y = rnd(33, 520, dtype=dtype, scale=3.0)
        b = rnd(520, dtype=dtype)
        want = torch.nn.functional.gelu(y.float() + b.float()).to(dtype)
        got = torch.ops.internvl_kernels_cuda.bias_gelu_(y.clone(), b)
        assert_close(got, want, **NORM_TOL[dtype])  # fp32 math identical up to FMA contraction: <= 1 ulp
