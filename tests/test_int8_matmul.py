"""int8_matmul: the W8A8 GEMM. The int32 accumulator of the Triton kernel equals the integer reference bit for bit;
the epilogue (per-token × per-channel scales, bias, exact GELU, one rounding) matches the reference within one
rounding of the output dtype; fp8 within the fp32 accumulation error."""
from __future__ import annotations

import importlib

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, assert_close, run_kernel

from internvl_kernels import ops, set_backend
from internvl_kernels.model import functional as F

IM = importlib.import_module("internvl_kernels.ops.int8_matmul")  # the module (ops.int8_matmul is the function)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# (M, K, N): M = 1 / 97 / 1025-ish, K and N not powers of two, K = 3200 (InternViT-6B width) at small M / N
SHAPES = [(1, 200, 96), (97, 200, 150), (1025, 64, 40), (5, 3200, 48), (33, 1000, 72)]
OUT_TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float16: dict(rtol=1e-3, atol=1e-5),
           torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}


def _codes(M, K, N, device, extreme=False):
    g = torch.Generator().manual_seed(M * 7 + K * 3 + N)
    lo, hi = (-127, 128)
    a = torch.randint(lo, hi, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int8)
    if extreme:  # every product at ±127²: the largest accumulator magnitudes
        a = torch.where(torch.rand(M, K, generator=g) < 0.5, -127, 127).to(torch.int8)
        w = torch.full((N, K), 127, dtype=torch.int8)
    return a.to(device), w.to(device)


@pytest.mark.parametrize("shape", SHAPES + [(3, 4096, 32)], ids=str)
def test_int32_accumulator_is_exact(shape, device):
    M, K, N = shape
    a, w = _codes(M, K, N, device, extreme=K == 4096)
    acc = run_kernel(ops.int8_matmul_accumulate, a, w)
    assert acc.dtype == torch.int32 and acc.shape == (M, N)
    ref = F.int8_matmul_accumulate(a, w)
    assert torch.equal(acc, ref), f"{int((acc != ref).sum())} accumulator entries differ"
    # and the reference itself is the integer product (int64 on CPU)
    if K <= 1000:
        assert torch.equal(ref.cpu().long(), a.cpu().long() @ w.cpu().long().t())


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("out_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_epilogue_matches_reference(shape, out_dtype, activation, device):
    M, K, N = shape
    a, w = _codes(M, K, N, device)
    sa = torch.rand(M, device=device) * 0.02 + 1e-3
    sw = torch.rand(N, device=device) * 0.01 + 1e-4
    bias = torch.randn(N, device=device, dtype=out_dtype if out_dtype != torch.float32 else torch.bfloat16)
    y = run_kernel(ops.int8_matmul, a, sa, w, sw, bias, activation, out_dtype)
    ref = F.int8_matmul(a, sa, w, sw, bias, activation, out_dtype)
    assert_close(y, ref, **OUT_TOL[out_dtype])
    if out_dtype == torch.float32 and activation == "none":
        assert torch.equal(y, ref)  # same fp32 operations in the same order: bit-identical


def test_batched_input_and_no_bias(device):
    a, w = _codes(2 * 17, 200, 96, device)
    a = a.view(2, 17, 200)
    sa = torch.rand(2, 17, device=device) + 0.01
    sw = torch.rand(96, device=device) + 0.01
    y = run_kernel(ops.int8_matmul, a, sa, w, sw, None, "none", torch.float32)
    assert y.shape == (2, 17, 96)
    assert torch.equal(y, F.int8_matmul(a.view(-1, 200), sa.view(-1), w, sw, None, "none", torch.float32).view(2, 17, 96))


@pytest.mark.parametrize("shape", [(1, 200, 96), (97, 320, 64), (1025, 64, 40)], ids=str)
def test_fp8(shape, device):
    M, K, N = shape
    g = torch.Generator().manual_seed(K)
    a = (torch.randn(M, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    w = (torch.randn(N, K, generator=g) * 100).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    sa = torch.rand(M, device=device) * 1e-3 + 1e-5
    sw = torch.rand(N, device=device) * 1e-3 + 1e-5
    bias = torch.randn(N, device=device)
    y = run_kernel(ops.int8_matmul, a, sa, w, sw, bias, "gelu", torch.float32)
    ref = F.int8_matmul(a, sa, w, sw, bias, "gelu", torch.float32)
    # products of e4m3 values are exact in fp32; only the fp32 accumulation rounds (K terms)
    acc_scale = (a.float().abs() @ w.float().abs().t()) * sa[:, None] * sw[None, :]
    assert not torch.isnan(y).any()
    assert bool(((y - ref).abs() <= 4 * K * 6e-8 * acc_scale + 1e-6).all())


def test_nan_scale_reaches_the_output(device):
    a, w = _codes(4, 64, 32, device)
    sa = torch.rand(4, device=device)
    sa[2] = float("nan")
    y = run_kernel(ops.int8_matmul, a, sa, w, torch.rand(32, device=device), None, "none", torch.bfloat16)
    assert torch.isnan(y[2]).all() and not torch.isnan(y[[0, 1, 3]]).any()


def test_choice_and_reasons(device):
    a, w = _codes(97, 200, 96, device)
    for impl in IM.IMPLS:
        ok, why = IM.can_implement(impl, a, w, torch.bfloat16)
        assert isinstance(ok, bool) and why
    if device.type == "cpu":
        assert IM.can_implement("cublaslt", a, w, torch.bfloat16) == (False, "cuBLASLt needs a CUDA device")
        run_kernel(ops.int8_matmul, a, torch.rand(97), w, torch.rand(96), None, "none", torch.bfloat16)
        choice = [v for k, v in ops.int8_matmul_choices().items() if k[1:3] == (96, 200)]
        assert choice and choice[0][0] == "triton" and "epilogue" in choice[0][1]


def test_forced_implementation_falls_back_with_reason(device, monkeypatch):
    a, w = _codes(8, 64, 16, device)
    monkeypatch.setenv("INTERNVL_KERNELS_W8A8_GEMM", "cublaslt")
    impl, why = IM.select(a, w, torch.bfloat16, "none")
    if device.type == "cpu":
        assert impl == "triton" and "cannot run this shape" in why
    monkeypatch.setenv("INTERNVL_KERNELS_W8A8_GEMM", "bogus")
    with pytest.raises(ValueError, match="INTERNVL_KERNELS_W8A8_GEMM"):
        IM.select(a, w, torch.bfloat16, "none")


@pytest.mark.gpu
def test_cublaslt_matches_triton_on_gpu():
    a, w = _codes(1025, 3200, 960, "cuda")
    sa, sw = torch.rand(1025, device="cuda") * 1e-3, torch.rand(960, device="cuda") * 1e-3
    b = torch.randn(960, device="cuda", dtype=torch.bfloat16)
    args = (a, sa, w, sw, b, False, torch.bfloat16)
    assert torch.equal(IM._FNS["triton"](*args).float(), IM._FNS["cublaslt"](*args).float()) or \
        torch.allclose(IM._FNS["triton"](*args).float(), IM._FNS["cublaslt"](*args).float(), rtol=8e-3, atol=1e-3)
    assert torch.equal(ops.int8_matmul_accumulate(a, w), torch._int_mm(a, w.t()))


def test_bad_inputs(device):
    a, w = _codes(4, 64, 32, device)
    sa, sw = torch.rand(4, device=device), torch.rand(32, device=device)
    with pytest.raises(TypeError, match="int8 or float8_e4m3fn"):
        ops.int8_matmul(a.float(), sa, w, sw)
    with pytest.raises(TypeError, match="same code dtype"):
        ops.int8_matmul(a, sa, w.to(torch.float8_e4m3fn), sw)
    with pytest.raises(ValueError, match="input features"):
        ops.int8_matmul(a[:, :32], sa, w, sw)
    with pytest.raises(ValueError, match="one scale per token"):
        ops.int8_matmul(a, sa[:3], w, sw)
    with pytest.raises(ValueError, match="one scale per output channel"):
        ops.int8_matmul(a, sa, w, sw[:3])
    with pytest.raises(TypeError, match="float32"):
        ops.int8_matmul(a, sa.half(), w, sw)
    with pytest.raises(ValueError, match="contiguous"):
        ops.int8_matmul(a, sa, w.t().contiguous().t(), sw)
    with pytest.raises(ValueError, match="activation"):
        ops.int8_matmul(a, sa, w, sw, None, "relu")
    with pytest.raises(TypeError, match="out_dtype"):
        ops.int8_matmul(a, sa, w, sw, None, "none", torch.int32)
    with set_backend("eager"):
        with pytest.raises(TypeError, match="int8 tensors"):
            ops.int8_matmul_accumulate(a.float(), w)
