"""qk_norm_attention: InternViT-6B attention from packed qkv with QK-RMSNorm over all C channels."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, assert_close, assert_flash_rule, run_eager, run_kernel
from _parity import HALF, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F
from internvl_kernels import options
from internvl_kernels.ops.qk_norm_attention import qk_rstd
from internvl_kernels.options import set_qk_norm

# the Triton interpreter's own NumPy deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.fixture(params=["fold", "exact"])
def mode(request):
    """The kernel's two ways of applying the k normalization (see ops/qk_norm_attention.py), as the default."""
    with set_qk_norm(request.param):
        yield request.param


def _inputs(B, S, H, D, dtype, device):
    C = H * D
    qkv = torch.randn(B, S, 3 * C, dtype=dtype, device=device) * 2
    wq = 1 + 0.3 * torch.randn(C, dtype=dtype, device=device)
    wk = 1 + 0.3 * torch.randn(C, dtype=dtype, device=device)
    return qkv, wq, wk


def _check(qkv, wq, wk, H, eps=1e-6, scale=None):
    out = run_kernel(ops.qk_norm_attention, qkv, wq, wk, H, eps, scale, min_launches=2)  # rstd pre-pass + attention
    ref64 = F.qk_norm_attention(qkv.double(), wq.double(), wk.double(), H, eps, scale)
    eager = F.qk_norm_attention(qkv, wq, wk, H, eps, scale)
    return assert_flash_rule(out, eager, ref64, qkv.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("H,D", [(3, 64), (2, 128)])
@pytest.mark.parametrize("S", [1, 17, 97])
def test_qk_norm_attention_flash_rule(S, H, D, dtype, mode, device):
    _check(*_inputs(2, S, H, D, dtype, device), H)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_qk_norm_attention_internvit_6b_width(dtype, mode, device):
    # the real channel layout: C = 3200 = 25 heads x 128, norm over all 3200 channels
    _check(*_inputs(1, 17, 25, 128, dtype, device), 25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_qk_norm_attention_length_1025(dtype, mode, device):
    _check(*_inputs(1, 1025, 1, 128, dtype, device), 1)


def test_qk_norm_attention_norm_spans_all_heads(mode, device):
    # a per-head RMSNorm would give a different answer: make the heads' scales very different and check the
    # kernel follows the all-channel reference, not the per-head variant
    qkv, wq, wk = _inputs(1, 17, 2, 64, torch.float32, device)
    qkv[..., :64] *= 10  # head 0 of q much larger than head 1
    out = run_kernel(ops.qk_norm_attention, qkv, wq, wk, 2)
    ref = F.qk_norm_attention(qkv, wq, wk, 2)
    assert_close(out, ref, rtol=1e-4, atol=1e-5)
    q, k, v = qkv.reshape(1, 17, 3, 2, 64).unbind(2)
    per_head = F.attention(F.rms_norm(q, wq.view(2, 64)), F.rms_norm(k, wk.view(2, 64)), v).reshape(1, 17, 128)
    assert (per_head - ref).abs().max() > 1e-2


def test_qk_rstd_prepass(device):
    qkv, _, _ = _inputs(2, 33, 3, 64, torch.bfloat16, device)
    with ops.poison_outputs():
        rstd = qk_rstd(qkv, 1e-6)
    C = 192
    x = qkv.float()
    ref = torch.stack([torch.rsqrt(x[..., :C].pow(2).mean(-1) + 1e-6), torch.rsqrt(x[..., C:2 * C].pow(2).mean(-1) + 1e-6)], -1)
    assert rstd.dtype == torch.float32 and rstd.shape == (2, 33, 2)
    assert_close(rstd, ref, rtol=1e-5, atol=0)


def test_qk_norm_attention_non_contiguous_qkv(mode, device):
    big, wq, wk = _inputs(2, 17, 2, 64, torch.float16, device)
    qkv = torch.cat([big, big[..., :5]], -1)[..., :384]  # row stride 389, a view
    assert not qkv.is_contiguous()
    _check(qkv, wq, wk, 2, scale=0.1)


def test_qk_norm_attention_modes_agree_and_unknown_mode_fails(monkeypatch, device):
    qkv, wq, wk = _inputs(1, 40, 2, 64, torch.float16, device)
    outs = {}
    for m in ("fold", "exact"):
        outs[m] = run_kernel(ops.qk_norm_attention, qkv, wq, wk, 2, qk_norm=m).float()
    assert (outs["fold"] - outs["exact"]).abs().max() < 5e-3
    with set_qk_norm("exact"):  # the process default, used when the call names no mode
        assert torch.equal(run_kernel(ops.qk_norm_attention, qkv, wq, wk, 2).float(), outs["exact"])
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        ops.qk_norm_attention(qkv, wq, wk, 2, qk_norm="sloppy")
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        set_qk_norm("sloppy")
    # the environment variable only sets the default (read once at import); a bad value names the variable
    monkeypatch.setenv("INTERNVL_KERNELS_QK_NORM", "sloppy")
    with pytest.raises(ValueError, match="INTERNVL_KERNELS_QK_NORM='sloppy'"):
        options.env_default("INTERNVL_KERNELS_QK_NORM", "fold", options.QK_NORM_MODES)


def test_qk_norm_attention_eager_backend_is_the_reference(device):
    qkv, wq, wk = _inputs(1, 9, 2, 64, torch.bfloat16, device)
    assert torch.equal(run_eager(ops.qk_norm_attention, qkv, wq, wk, 2), F.qk_norm_attention(qkv, wq, wk, 2))


def test_qk_norm_attention_bad_inputs(device):
    qkv, wq, wk = _inputs(1, 9, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="3 \\* C"):
        ops.qk_norm_attention(qkv[..., :-1], wq, wk, 2)
    with pytest.raises(ValueError, match="num_heads"):
        ops.qk_norm_attention(qkv, wq, wk, 3)
    with pytest.raises(TypeError, match="q_norm_weight has dtype"):
        ops.qk_norm_attention(qkv, wq.half(), wk, 2)
    with pytest.raises(ValueError, match="k_norm_weight must have shape"):
        ops.qk_norm_attention(qkv, wq, wk[:5], 2)
    with pytest.raises(ValueError, match="head_dim 32"):
        run_kernel(ops.qk_norm_attention, qkv, wq, wk, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("B,S", [(13, 1025), (1, 1025), (2, 4097)])
def test_qk_norm_attention_full_shapes(B, S, dtype, mode, device):
    _check(*_inputs(B, S, 25, 128, dtype, device), 25)


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("B,S,C,H", [(2, 1025, 3200, 25), (1, 17, 256, 4), (2, 97, 512, 4), (1, 1, 128, 2)])
def test_qk_norm_attention(gpu_backend, B, S, C, H, dtype):
    qkv = rnd(B, S, 3 * C, dtype=dtype, scale=2.0)
    qw, kw = 1 + rnd(C, dtype=dtype, scale=0.2), 1 + rnd(C, dtype=dtype, scale=0.2)
    out = parity_run(gpu_backend, "qk_norm_attention", ops.qk_norm_attention, qkv, qw, kw, H, 1e-6, None)
    ref64 = F.qk_norm_attention(qkv.double(), qw.double(), kw.double(), H, 1e-6)
    assert_flash_rule(out, F.qk_norm_attention(qkv, qw, kw, H, 1e-6), ref64, dtype)


@pytest.mark.gpu
def test_qk_norm_attention_fp32_routes_to_triton(gpu_backend):
    qkv = rnd(1, 17, 3 * 256, dtype=torch.float32)
    qw, kw = rnd(256, dtype=torch.float32), rnd(256, dtype=torch.float32)
    out = parity_run(gpu_backend, "qk_norm_attention", ops.qk_norm_attention, qkv, qw, kw, 4, 1e-6, None, expect="triton")
    ref64 = F.qk_norm_attention(qkv.double(), qw.double(), kw.double(), 4, 1e-6)
    assert_flash_rule(out, F.qk_norm_attention(qkv, qw, kw, 4, 1e-6), ref64, torch.float32)
