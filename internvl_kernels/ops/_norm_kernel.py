"""The row-normalization kernel shared by rms_norm, layer_norm, add_rms_norm and add_layer_norm.

One program normalizes ``BLOCK_M`` rows of ``N`` channels held entirely in registers (``BLOCK_N = next_pow2(N)``):
one read of each input and one write of each output, statistics in fp32. Optional prologue: the InternViT block's
residual update ``new_residual = residual + x * scale`` (rounded like the eager code: the product to its dtype
first, then the sum), written out and normalized in the same pass.

Rounding follows :mod:`internvl_kernels.model.functional` exactly: RMSNorm casts ``x * rstd`` to the input dtype
before multiplying by the weight (Llama casting); LayerNorm applies weight and bias in fp32 and rounds once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import count_launch, new_empty, next_pow2, tl_dtype
from ._tl import to_dtype

MAX_FUSED_N = 65536  # channels one program can hold (fp32 registers / shared spill beyond that)


@triton.jit
def load_rows_with_residual(X, R, SCALE, RES_OUT, M, N, stride_x, stride_r, stride_ro,
                            HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, PROD_DT: tl.constexpr,
                            RES_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's ``BLOCK_M`` rows of ``X`` in fp32, after the optional residual prologue
    ``new_residual = residual + x * scale`` (rounded like the eager code: the product to ``PROD_DT`` first, then the
    sum to ``RES_DT``; written to ``RES_OUT``). Shared by every row-norm kernel (plain and + quantization)."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    mask = rmask[:, None] & cmask[None, :]
    # every value is upcast to fp32 right after the load (bf16 arithmetic is not exact in the interpreter, and fp32
    # is what the eager code computes in before it rounds)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        if HAS_SCALE:
            s = tl.load(SCALE + cols, mask=cmask, other=0.0).to(tl.float32)
            x = to_dtype(x * s[None, :], PROD_DT).to(tl.float32)
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = to_dtype(r + x, RES_DT)
        tl.store(RES_OUT + rows[:, None] * stride_ro + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    return rows, cols, cmask, mask, x


@triton.jit
def _norm_rows_kernel(
    X, R, SCALE, W, B, Y, RES_OUT,
    M, N,
    stride_x, stride_r, stride_y, stride_ro,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    PROD_DT: tl.constexpr,
    RES_DT: tl.constexpr,
    XN_DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows, cols, cmask, mask, x = load_rows_with_residual(
        X, R, SCALE, RES_OUT, M, N, stride_x, stride_r, stride_ro, HAS_RES, HAS_SCALE, PROD_DT, RES_DT, BLOCK_M, BLOCK_N)

    if IS_RMS:
        ms = tl.sum(x * x, axis=1) / N
        rstd = tl.rsqrt(ms + eps)
        y = to_dtype(x * rstd[:, None], XN_DT).to(tl.float32)
    else:
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / N
        rstd = tl.rsqrt(var + eps)
        y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], to_dtype(y, Y.dtype.element_ty), mask=mask)


def launch_settings(n: int, m: int):
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n`` channels: ~4K elements per program, ≤ 32 per thread."""
    block_n = next_pow2(n)
    block_m = max(1, min(next_pow2(max(m, 1)), 4096 // block_n))
    elems = block_m * block_n
    num_warps = max(2, min(16, elems // 512))
    return block_m, block_n, num_warps


def norm_rows(
    op: str,
    x2: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    *,
    is_rms: bool,
    out_dtype: torch.dtype,
    residual2: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    res_dtype: torch.dtype | None = None,
    prod_dtype: torch.dtype | None = None,
):
    """Launch the kernel on ``[M, N]`` rows (unit channel stride). Returns ``y`` or ``(new_residual, y)``."""
    M, N = x2.shape
    if N > MAX_FUSED_N:
        raise ValueError(f"{op}: {N} channels exceed the fused kernel's limit of {MAX_FUSED_N}")
    y = new_empty((M, N), out_dtype, x2.device)
    has_res = residual2 is not None
    if has_res:
        res_out = new_empty((M, N), res_dtype, x2.device)
        r, stride_r, stride_ro = residual2, residual2.stride(0), res_out.stride(0)
    else:
        res_out, r, stride_r, stride_ro = y, x2, 0, 0
    xn_dtype = res_dtype if has_res else x2.dtype
    block_m, block_n, num_warps = launch_settings(N, M)
    if M > 0:
        dummy = x2
        grid = (triton.cdiv(M, block_m),)
        _norm_rows_kernel[grid](
            x2, r, scale if scale is not None else dummy, weight if weight is not None else dummy,
            bias if bias is not None else dummy, y, res_out,
            M, N, x2.stride(0), stride_r, y.stride(0), stride_ro, float(eps),
            IS_RMS=is_rms, HAS_RES=has_res, HAS_SCALE=scale is not None, HAS_W=weight is not None,
            HAS_B=bias is not None,
            PROD_DT=tl_dtype(prod_dtype or x2.dtype), RES_DT=tl_dtype(res_dtype or x2.dtype), XN_DT=tl_dtype(xn_dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            # no mul+add → FMA contraction: the residual update must round like the eager two-kernel code
            enable_fp_fusion=False,
        )
        count_launch(op)
    return (res_out, y) if has_res else y
