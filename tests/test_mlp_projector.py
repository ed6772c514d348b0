"""mlp_projector (LN → Linear → GELU → Linear); the linear op it is built from is tests/test_linear.py."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, assert_flash_rule, run_eager, run_kernel

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
