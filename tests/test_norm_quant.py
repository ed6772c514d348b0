"""add_rms_norm_quant / add_layer_norm_quant / rms_norm_quant / layer_norm_quant: norm + per-token int8 / fp8 codes.

The fused kernel computes the normalized row exactly as the norm kernels do, rounds it to the norm's output dtype and
quantizes it in registers. Checks: (1) the codes and scales equal, bit for bit, the reference quantization of the
unfused Triton norm's output (the quantization step itself is exact); (2) against the pure eager reference they
agree except where the fp32 statistics' summation order flips one rounding of the normed value (≤ 1 code, rare);
(3) the new residual is bit-identical to the reference's.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, run_kernel

from internvl_kernels import ops
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

SHAPES = [(1, 1, 3200), (2, 17, 200), (1, 97, 576), (1, 1025, 64), (1, 2, 12800)]


def _inputs(shape, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    res = torch.randn(shape, dtype=dtype, device=device) * 4
    w = 1 + 0.3 * torch.randn(shape[-1], dtype=dtype, device=device)
    b = 0.5 * torch.randn(shape[-1], dtype=dtype, device=device)
    s = 0.1 * (1 + 0.3 * torch.randn(shape[-1], dtype=dtype, device=device))
    return x, res, w, b, s


def assert_codes_equal(q, ref_q, what="codes"):
    assert q.dtype == ref_q.dtype and q.shape == ref_q.shape, f"{what}: {q.dtype}{tuple(q.shape)} vs " \
                                                              f"{ref_q.dtype}{tuple(ref_q.shape)}"
    if q.dtype == torch.int8:
        assert int(q.min()) >= -127, f"{what}: code -128 (poison) — an element was not written"
        bad = q != ref_q
    else:
        assert not torch.isnan(q.float()).any(), f"{what}: NaN code (poison) — an element was not written"
        bad = q.view(torch.uint8) != ref_q.view(torch.uint8)
    assert not bool(bad.any()), f"{what}: {int(bad.sum())}/{q.numel()} codes differ"


def assert_codes_near(q, ref_q, max_frac=2e-3):
    """Codes of two ways of computing the normed value: equal except where one rounding of it flipped."""
    d = (q.float() - ref_q.float()).abs()
    assert not torch.isnan(d).any()
    if q.dtype == torch.int8:
        assert float(d.max()) <= 1, f"codes differ by up to {float(d.max())}"
    else:  # one e4m3 step: 1/8 relative (1/16 below half the binade)
        assert bool((d <= ref_q.float().abs() / 8 + 2 ** -9).all())
    assert float((d > 0).float().mean()) <= max_frac, f"{int((d > 0).sum())} codes differ"


def _check_scales(s, ref_s, exact):
    assert s.dtype == torch.float32 and s.shape == ref_s.shape
    assert not torch.isnan(s).any(), "scales have NaN (not written)"
    if exact:
        assert torch.equal(s, ref_s)
    else:
        assert torch.allclose(s, ref_s, rtol=8e-3, atol=0)


@pytest.mark.parametrize("quant_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_quant(shape, dtype, quant_dtype, device):
    x, res, w, _, s = _inputs(shape, dtype, device)
    r, q, qs = run_kernel(ops.add_rms_norm_quant, x, res, w, 1e-6, s, quant_dtype)
    ref_r, ref_q, ref_s = F.add_rms_norm_quant(x, res, w, 1e-6, s, quant_dtype)
    assert torch.equal(r, ref_r)
    # exact: the reference quantization of the unfused Triton norm's output
    _, y_kernel = run_kernel(ops.add_rms_norm, x, res, w, 1e-6, s)
    q2, s2 = F.quantize_per_token(y_kernel, quant_dtype)
    assert_codes_equal(q, q2)
    _check_scales(qs, s2, exact=True)
    # against the pure reference
    assert_codes_near(q, ref_q)
    _check_scales(qs, ref_s, exact=False)


@pytest.mark.parametrize("quant_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_add_layer_norm_quant(shape, dtype, quant_dtype, device):
    x, res, w, b, s = _inputs(shape, dtype, device)
    r, q, qs = run_kernel(ops.add_layer_norm_quant, x, res, w, b, 1e-6, s, quant_dtype)
    ref_r, ref_q, ref_s = F.add_layer_norm_quant(x, res, w, b, 1e-6, s, quant_dtype)
    assert torch.equal(r, ref_r)
    _, y_kernel = run_kernel(ops.add_layer_norm, x, res, w, b, 1e-6, s)
    q2, s2 = F.quantize_per_token(y_kernel, quant_dtype)
    assert_codes_equal(q, q2)
    _check_scales(qs, s2, exact=True)
    assert_codes_near(q, ref_q)
    _check_scales(qs, ref_s, exact=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 3200), (2, 97, 200), (1, 1025, 64)], ids=str)
def test_plain_norm_quant(shape, dtype, device):
    x, _, w, b, _ = _inputs(shape, dtype, device)
    q, qs = run_kernel(ops.rms_norm_quant, x, w, 1e-6)
    q2, s2 = F.quantize_per_token(run_kernel(ops.rms_norm, x, w, 1e-6))
    assert_codes_equal(q, q2)
    _check_scales(qs, s2, exact=True)
    assert_codes_near(q, F.rms_norm_quant(x, w, 1e-6)[0])
    q, qs = run_kernel(ops.layer_norm_quant, x, w, b, 1e-6)
    q2, s2 = F.quantize_per_token(run_kernel(ops.layer_norm, x, w, b, 1e-6))
    assert_codes_equal(q, q2)
    _check_scales(qs, s2, exact=True)
    assert_codes_near(q, F.layer_norm_quant(x, w, b, 1e-6)[0])


@pytest.mark.parametrize("quant_dtype", ["int8", "fp8"])
def test_static_input_scale(quant_dtype, device):
    x, res, w, _, s = _inputs((2, 33, 200), torch.bfloat16, device)
    st = torch.tensor([0.011], device=device)  # small: some values saturate at ±qmax
    r, q, qs = run_kernel(ops.add_rms_norm_quant, x, res, w, 1e-6, s, quant_dtype, st)
    _, y = run_kernel(ops.add_rms_norm, x, res, w, 1e-6, s)
    q2, s2 = F.quantize_per_token(y, quant_dtype, st)
    assert_codes_equal(q, q2)
    assert torch.equal(qs, torch.full_like(qs, 0.011))
    qmax = F.quant_max(quant_dtype)
    assert float(q.float().abs().max()) == qmax  # saturation really happened, and was clamped


def test_codes_reconstruct_the_normed_value(device):
    # codes * scale ≈ the normed activation to within half a quantization step
    x, res, w, _, s = _inputs((3, 7, 576), torch.float32, device)
    _, q, qs = run_kernel(ops.add_rms_norm_quant, x, res, w, 1e-6, s)
    _, y = F.add_rms_norm(x, res, w, 1e-6, s)
    err = (q.float() * qs[..., None] - y).abs()
    assert bool((err <= qs[..., None] * 0.5 * (1 + 1e-5)).all())
    assert float(q.abs().amax(-1).min()) == 127  # every row uses the full range


def test_bad_inputs(device):
    x, res, w, b, s = _inputs((2, 4, 64), torch.float32, device)
    with pytest.raises(ValueError, match="quant_dtype must be one of"):
        ops.add_rms_norm_quant(x, res, w, 1e-6, s, "int4")
    with pytest.raises(ValueError, match="input_scale must be a 1-element float32"):
        ops.rms_norm_quant(x, w, 1e-6, "int8", torch.ones(2))
    with pytest.raises(ValueError, match="residual has shape"):
        ops.add_layer_norm_quant(x, res[:1], w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm_quant(x, w[:3])
    with pytest.raises(TypeError, match="dtype torch.int8"):
        ops.rms_norm_quant(x.to(torch.int8), w)
    with pytest.raises(TypeError, match="residual has dtype"):
        ops.add_rms_norm_quant(x, res.half(), w)
