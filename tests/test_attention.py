"""attention: flash-attention kernel vs the eager reference, by the flash-attention rule."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, assert_flash_rule, run_eager, run_kernel

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
