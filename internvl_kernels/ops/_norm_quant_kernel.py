"""Row kernel shared by the W8A8 activation ops: (residual update →) (norm →) per-token int8 / fp8 quantization.

One program handles ``BLOCK_M`` rows of ``N`` channels held in registers (``BLOCK_N = next_pow2(N)``), like
:mod:`internvl_kernels.ops._norm_kernel` (same prologue and norm arithmetic, in the same order, so the normalized
value is the one ``add_rms_norm`` / ``rms_norm`` / ``layer_norm`` produce), then, still in registers:

* the normalized row is rounded to the norm's output dtype (what the unfused norm op would have written),
* ``scale = max(amax, AMAX_FLOOR) / qmax`` (IEEE division, ``div_rn``) — or the static per-tensor scale,
* ``codes = clamp(y / scale, -qmax, qmax)`` rounded half-to-even: int8 via the fp32 magic-number rounding
  ``(v + 1.5·2²³) − 1.5·2²³`` (exact RNE for |v| ≤ 2²²), fp8 via the hardware's RNE cast on a GPU. The Triton
  interpreter's fp32→fp8 cast mis-rounds values that carry into the next binade (125.4 → 64) and drops the sign
  of zero, so under the interpreter the e4m3 bit pattern is computed by integer arithmetic and stored as uint8.

Writes: the new residual (when there is a residual update), the codes and the fp32 per-token scales. The normalized
activation itself never goes to memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..model.functional import AMAX_FLOOR, quant_max
from . import _common
from ._common import INTERPRET, count_launch, new_empty, next_pow2, tl_dtype
from ._norm_kernel import load_rows_with_residual
from ._tl import to_dtype

MAX_FUSED_N = 65536
NORM_IDS = {"none": 0, "rms": 1, "layer": 2}
_EMULATE_FP8 = tl.constexpr(INTERPRET)


@triton.jit
def _e4m3_bits(v):
    """float8_e4m3fn bit pattern (uint8) of fp32 ``v`` (|v| ≤ 448), round to nearest even (interpreter only)."""
    a = tl.abs(v)
    sign = (v.to(tl.uint32, bitcast=True) >> 24) & 0x80
    # normals (|v| ≥ 2^-6): round the fp32 mantissa to 3 bits (half to even on the dropped 20 bits)
    bits = a.to(tl.uint32, bitcast=True)
    nb = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    e = ((nb >> 23) & 0xFF).to(tl.int32) - 120  # rebias 127 → 7
    normal = (tl.maximum(e, 0).to(tl.uint32) << 3) | ((nb >> 20) & 7)
    # subnormals: multiples of 2^-9 (adding 1.5·2^14 leaves exactly 9 fractional bits, RNE)
    sub = (((a + 24576.0) - 24576.0) * 512.0).to(tl.uint32)
    return (sign | tl.where(a >= 0.015625, normal, sub)).to(tl.uint8)


@triton.jit
def _norm_quant_kernel(
    X, R, SCALE, W, B, RES_OUT, Q, QS, IN_SCALE,
    M, N,
    stride_x, stride_r, stride_ro, stride_q,
    eps, amax_floor, qmax,
    NORM: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    STATIC: tl.constexpr,
    FP8: tl.constexpr,
    PROD_DT: tl.constexpr,
    RES_DT: tl.constexpr,
    XN_DT: tl.constexpr,
    Y_DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, cmask, mask, x = load_rows_with_residual(
        X, R, SCALE, RES_OUT, M, N, stride_x, stride_r, stride_ro, HAS_RES, HAS_SCALE, PROD_DT, RES_DT, BLOCK_M, BLOCK_N)

    if NORM == 1:
        ms = tl.sum(x * x, axis=1) / N
        rstd = tl.rsqrt(ms + eps)
        y = to_dtype(x * rstd[:, None], XN_DT).to(tl.float32)
    elif NORM == 2:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = tl.rsqrt(var + eps)
        y = xc * rstd[:, None]
    else:
        y = x
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    # the value the unfused norm op would have written, back in fp32
    y = to_dtype(y, Y_DT).to(tl.float32)
    y = tl.where(mask, y, 0.0)

    if STATIC:
        sc = tl.load(IN_SCALE).to(tl.float32) + tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        amax = tl.maximum(tl.max(tl.abs(y), axis=1), amax_floor)
        sc = tl.math.div_rn(amax, qmax + tl.zeros([BLOCK_M], dtype=tl.float32))
        # a NaN anywhere in the row makes its scale NaN (as torch's amax does): it reaches the GEMM output
        has_nan = tl.sum((y != y).to(tl.int32), axis=1) > 0
        sc = tl.where(has_nan, float("nan"), sc)
    v = tl.math.div_rn(y, sc[:, None] + tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    qptr = Q + rows[:, None] * stride_q + cols[None, :]
    if FP8:
        if _EMULATE_FP8:  # Q is a uint8 view of the codes
            tl.store(qptr, _e4m3_bits(v), mask=mask)
        else:
            tl.store(qptr, v.to(tl.float8e4nv), mask=mask)
    else:
        v = (v + 12582912.0) - 12582912.0  # round half to even (|v| ≤ 127)
        tl.store(qptr, v.to(tl.int8), mask=mask)
    tl.store(QS + rows, sc, mask=rows < M)


def new_codes(shape, quant_dtype: str, device) -> torch.Tensor:
    """Code buffer; under :func:`~internvl_kernels.ops.poison_outputs` pre-filled with a value no kernel writes
    (int8: -128, outside the symmetric range ±127; fp8: NaN), so an element left unwritten fails the tests."""
    from ..model.functional import QUANT_DTYPES

    q = torch.empty(shape, dtype=QUANT_DTYPES[quant_dtype], device=device)
    if _common._POISON[0] is not None:
        if quant_dtype == "int8":
            q.fill_(-128)
        else:
            q.view(torch.uint8).fill_(0x7F)  # e4m3fn NaN
    return q


def launch_settings(n: int, m: int):
    """(BLOCK_M, BLOCK_N, num_warps): ~4K elements per program, ≤ 32 per thread."""
    block_n = next_pow2(n)
    block_m = max(1, min(next_pow2(max(m, 1)), 4096 // block_n))
    num_warps = max(2, min(16, block_m * block_n // 512))
    return block_m, block_n, num_warps


def norm_quant_rows(
    op: str,
    x2: torch.Tensor,
    *,
    norm: str,
    quant_dtype: str,
    y_dtype: torch.dtype,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 0.0,
    residual2: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    res_dtype: torch.dtype | None = None,
    prod_dtype: torch.dtype | None = None,
    input_scale: torch.Tensor | None = None,
):
    """Launch on ``[M, N]`` rows (unit channel stride). Returns ``(new_residual or None, codes [M, N], scales [M])``."""
    M, N = x2.shape
    if N > MAX_FUSED_N:
        raise ValueError(f"{op}: {N} channels exceed the fused kernel's limit of {MAX_FUSED_N}")
    dev = x2.device
    q = new_codes((M, N), quant_dtype, dev)
    qs = new_empty((M,), torch.float32, dev)
    has_res = residual2 is not None
    if has_res:
        res_out = new_empty((M, N), res_dtype, dev)
        r, stride_r, stride_ro = residual2, residual2.stride(0), res_out.stride(0)
    else:
        res_out, r, stride_r, stride_ro = qs, x2, 0, 0
    xn_dtype = res_dtype if has_res else x2.dtype
    block_m, block_n, num_warps = launch_settings(N, M)
    if M > 0:
        dummy = x2
        _norm_quant_kernel[(triton.cdiv(M, block_m),)](
            x2, r, scale if scale is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy, res_out,
            q.view(torch.uint8) if (INTERPRET and quant_dtype == "fp8") else q, qs, input_scale if input_scale is not None else qs,
            M, N, x2.stride(0), stride_r, stride_ro, q.stride(0), float(eps), float(AMAX_FLOOR),
            float(quant_max(quant_dtype)),
            NORM=NORM_IDS[norm], HAS_RES=has_res, HAS_SCALE=scale is not None, HAS_W=weight is not None,
            HAS_B=bias is not None, STATIC=input_scale is not None, FP8=quant_dtype == "fp8",
            PROD_DT=tl_dtype(prod_dtype or x2.dtype), RES_DT=tl_dtype(res_dtype or x2.dtype),
            XN_DT=tl_dtype(xn_dtype), Y_DT=tl_dtype(y_dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            enable_fp_fusion=False,  # the residual update and the rounding trick must not contract into FMAs
        )
        count_launch(op)
    return (res_out if has_res else None), q, qs
