"""attention: flash-attention kernel vs the eager reference, by the flash-attention rule."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, assert_flash_rule, run_eager, run_kernel
from _parity import HALF, IDS, gpu_backend, parity_run, require_cuda_ext, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _qkv(B, Sq, Skv, H, D, dtype, device):
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Skv, H, D, dtype=dtype, device=device)
    v = torch.randn(B, Skv, H, D, dtype=dtype, device=device)
    return q, k, v


def _check(q, k, v, scale=None):
    out = run_kernel(ops.attention, q, k, v, scale)
    ref64 = F.attention(q.double(), k.double(), v.double(), scale)
    eager = F.attention(q, k, v, scale)
    assert out.is_contiguous()
    return assert_flash_rule(out, eager, ref64, q.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 17, 97])
def test_attention_flash_rule(S, D, dtype, device):
    _check(*_qkv(2, S, S, 2, D, dtype, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("D", [64, 128])
def test_attention_internvit_length_1025(D, dtype, device):
    # 1024 patches + cls: one token past a block multiple (query tail launch + 32-wide key tail)
    _check(*_qkv(1, 1025, 1025, 1, D, dtype, device))


@pytest.mark.parametrize("Sq,Skv", [(17, 97), (97, 1), (33, 65)])
def test_attention_different_query_and_key_lengths(Sq, Skv, device):
    _check(*_qkv(2, Sq, Skv, 3, 64, torch.float16, device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_strided_views_of_packed_qkv(dtype, device):
    # the 300M-shape path: q, k, v are non-contiguous views of the qkv projection output, read in place
    B, S, H, D = 2, 37, 3, 64
    qkv = torch.randn(B, S, 3 * H * D, dtype=dtype, device=device)
    q, k, v = qkv.reshape(B, S, 3, H, D).unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v)


def test_attention_custom_scale(device):
    _check(*_qkv(1, 40, 40, 2, 128, torch.float32, device), scale=0.3)


def test_attention_large_logits_are_stable(device):
    # online softmax: huge scores must not overflow (the max is subtracted per block)
    q, k, v = _qkv(1, 70, 70, 1, 64, torch.float32, device)
    out = run_kernel(ops.attention, q * 30, k * 30, v)
    ref = F.attention((q * 30).double(), (k * 30).double(), v.double())
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 1e-4


def test_attention_eager_backend_is_the_reference(device):
    q, k, v = _qkv(2, 17, 17, 2, 64, torch.bfloat16, device)
    assert torch.equal(run_eager(ops.attention, q, k, v), F.attention(q, k, v))


def test_attention_unsupported_head_dim(device):
    q, k, v = _qkv(1, 8, 8, 2, 80, torch.float32, device)
    with pytest.raises(ValueError, match="head_dim 80"):
        run_kernel(ops.attention, q, k, v)
    # the eager backend covers any head_dim
    assert torch.equal(run_eager(ops.attention, q, k, v), F.attention(q, k, v).contiguous())


def test_attention_bad_inputs(device):
    q, k, v = _qkv(1, 8, 8, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="rank 4"):
        ops.attention(q[0], k[0], v[0])
    with pytest.raises(TypeError, match="k has dtype"):
        ops.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="head_dim must match"):
        ops.attention(q, k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="same shape"):
        ops.attention(q, k, v[:, :4])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,S,H,D", [(13, 1025, 25, 128), (13, 1025, 16, 64), (1, 4097, 25, 128)])
def test_attention_full_shapes(B, S, H, D, dtype, device):
    _check(*_qkv(B, S, S, H, D, dtype, device))


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


def _att_inputs(B, Sq, Skv, H, D, dtype):
    return rnd(B, Sq, H, D, dtype=dtype), rnd(B, Skv, H, D, dtype=dtype), rnd(B, Skv, H, D, dtype=dtype)


def _att_check(gpu_backend, q, k, v, scale=None, expect=None):
    out = parity_run(gpu_backend, "attention", ops.attention, q, k, v, scale, expect=expect)
    ref64 = F.attention(q.double(), k.double(), v.double(), scale)
    return assert_flash_rule(out, F.attention(q, k, v, scale), ref64, q.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 17, 64, 97, 1025])
def test_attention(gpu_backend, S, D, dtype):
    _att_check(gpu_backend, *_att_inputs(2, S, S, 3, D, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_internvit_6b_full(gpu_backend, dtype):
    _att_check(gpu_backend, *_att_inputs(2, 1025, 1025, 25, 128, dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("Sq,Skv", [(1, 1025), (97, 17), (130, 64)])
def test_attention_cross_lengths(gpu_backend, Sq, Skv, dtype):
    _att_check(gpu_backend, *_att_inputs(1, Sq, Skv, 2, 64, dtype), scale=0.3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_strided_views_of_packed_qkv(gpu_backend, dtype):
    """q/k/v as strided views of one [B, S, 3, H, D] buffer (how a model hands them over): no copies needed."""
    qkv = rnd(2, 97, 3, 4, 128, dtype=dtype)
    q, k, v = qkv.unbind(2)
    _att_check(gpu_backend, q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_large_logits_are_stable(gpu_backend, dtype):
    q, k, v = _att_inputs(1, 200, 200, 2, 64, dtype)
    _att_check(gpu_backend, q * 8, k * 8, v)


@pytest.mark.gpu
def test_attention_fp32_routes_to_triton(gpu_backend):
    _att_check(gpu_backend, *_att_inputs(1, 33, 33, 2, 64, torch.float32), expect="triton")


@pytest.mark.gpu
def test_attention_head_dim_error_is_clear():
    require_cuda_ext()
    q = rnd(1, 8, 2, 96, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        torch.ops.internvl_kernels_cuda.attention(q, q, q, None)
