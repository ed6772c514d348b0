"""``pixel_shuffle`` and ``pixel_shuffle_layer_norm``: InternVL's token merge, without the eager code's copies.

The eager ``pixel_shuffle`` (reshape → permute → contiguous → view → [permute → contiguous]) makes one or two full
copies of the ViT output. Here each output token is gathered directly: with ``r = 1 / scale_factor`` and a square
grid of side ``n``, merged token ``o`` is the concatenation of ``r²`` contiguous ``C``-channel segments, segment
``s = ir·r + jr`` coming from source token ``(i'·r + ir)·n + j'·r + jr`` where ``(i', j') = (o mod n/r, o div n/r)``
for **v1** (V1.1/V1.2: the merged grid stays transposed) and ``(o div n/r, o mod n/r)`` for **v2** (V1.5).

``pixel_shuffle_layer_norm`` applies the projector's LayerNorm (``mlp1.0``, eps 1e-5) to each gathered row in
registers and writes only the normalized ``[B, N/r², r²·C]`` tensor — the shuffled copy never exists.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import (
    on_input_device,
    check_float, check_rank, check_same_device, check_vector, count_launch, new_empty, next_pow2,
)
from ._norm_kernel import MAX_FUSED_N
from ._tl import to_dtype

OP = "pixel_shuffle"
OP_LN = "pixel_shuffle_layer_norm"


@triton.jit
def _src_rows(o, SIDE, R: tl.constexpr, R2P: tl.constexpr, V2: tl.constexpr):
    """Source token index of each of the r² segments of merged token ``o`` (padded to R2P lanes)."""
    s2 = SIDE // R
    if V2:
        ii = o // s2
        jj = o % s2
    else:
        jj = o // s2
        ii = o % s2
    seg = tl.arange(0, R2P)
    ir = seg // R
    jr = seg % R
    return (ii * R + ir) * SIDE + jj * R + jr, seg


@triton.jit
def _pixel_shuffle_kernel(
    X, Y, N_OUT, C, SIDE,
    stride_xb, stride_xn, stride_yb, stride_yn,
    R: tl.constexpr, R2P: tl.constexpr, V2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // N_OUT).to(tl.int64)
    o = pid % N_OUT
    src, seg = _src_rows(o, SIDE, R, R2P, V2)
    smask = seg < R * R
    x_row = X + b * stride_xb + src.to(tl.int64)[:, None] * stride_xn
    y_row = Y + b * stride_yb + o.to(tl.int64) * stride_yn + (seg * C)[:, None]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = smask[:, None] & (cols[None, :] < C)
        v = tl.load(x_row + cols[None, :], mask=mask, other=0.0)
        tl.store(y_row + cols[None, :], v, mask=mask)


@triton.jit
def _pixel_shuffle_ln_kernel(
    X, W, B, Y, N_OUT, C, SIDE,
    stride_xb, stride_xn, stride_yb, stride_yn, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    R: tl.constexpr, R2P: tl.constexpr, V2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // N_OUT).to(tl.int64)
    o = pid % N_OUT
    src, seg = _src_rows(o, SIDE, R, R2P, V2)
    cols = tl.arange(0, BLOCK_C)
    mask = (seg < R * R)[:, None] & (cols[None, :] < C)
    x = tl.load(X + b * stride_xb + src.to(tl.int64)[:, None] * stride_xn + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    n = C * R * R
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / n
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(tl.sum(xc * xc, axis=1), axis=0) / n
    y = xc * tl.rsqrt(var + eps)
    ch = (seg * C)[:, None] + cols[None, :]  # channel of the merged row
    if HAS_W:
        y = y * tl.load(W + ch, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + ch, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + b * stride_yb + o.to(tl.int64) * stride_yn + ch, to_dtype(y, Y.dtype.element_ty), mask=mask)


def _ratio(op: str, scale_factor: float) -> int:
    if not scale_factor > 0:
        raise ValueError(f"{op}: scale_factor must be positive, got {scale_factor}")
    r = round(1 / scale_factor)
    if r < 1 or abs(r * scale_factor - 1) > 1e-9:
        raise ValueError(f"{op}: 1 / scale_factor must be an integer, got scale_factor={scale_factor}")
    return r


def _check_grid(op: str, x: Tensor, scale_factor: float, version: str):
    check_float(op, "x", x)
    check_rank(op, "x", x, 3)
    if version not in ("v1", "v2"):
        raise ValueError(f"{op}: version must be 'v1' or 'v2', got {version!r}")
    r = _ratio(op, scale_factor)
    B, N, C = x.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"{op}: {N} tokens do not form a square grid (drop the cls token first)")
    if side % r:
        raise ValueError(f"{op}: grid {side}x{side} is not divisible by 1/scale_factor={r}")
    return B, N, C, side, r


def _x_rows(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------------------------------- pixel_shuffle
@on_input_device
def pixel_shuffle_triton(x: Tensor, scale_factor: float = 0.5, version: str = "v2") -> Tensor:
    B, N, C, side, r = _check_grid(OP, x, scale_factor, version)
    x = _x_rows(x)
    n_out = N // (r * r)
    y = new_empty((B, n_out, C * r * r), x.dtype, x.device)
    if B * n_out == 0 or C == 0:
        return y
    r2p = next_pow2(r * r)
    block_c = max(1, min(next_pow2(C), 8192 // r2p))
    num_warps = max(1, min(8, r2p * block_c // 1024))
    _pixel_shuffle_kernel[(B * n_out,)](
        x, y, n_out, C, side, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        R=r, R2P=r2p, V2=version == "v2", BLOCK_C=block_c, num_warps=num_warps,
    )
    count_launch(OP)
    return y


def pixel_shuffle_eager(x: Tensor, scale_factor: float = 0.5, version: str = "v2") -> Tensor:
    y = F_ref.pixel_shuffle(x, scale_factor, version).contiguous()
    if y.numel() == 0 or y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        # a single output token (or none) is a pure reshape, i.e. a view of x: a custom op may not return an alias
        y = y.clone()
    return y


_backend.register_impl(OP, "eager", pixel_shuffle_eager)
_backend.register_impl(OP, "triton", pixel_shuffle_triton)


@torch.library.custom_op("internvl_kernels::pixel_shuffle", mutates_args=())
def _pixel_shuffle_op(x: Tensor, scale_factor: float, version: str) -> Tensor:
    _check_grid(OP, x, scale_factor, version)
    return _backend.dispatch(OP, x.device)(x, scale_factor, version)


@_pixel_shuffle_op.register_fake
def _(x, scale_factor, version):
    B, N, C, _, r = _check_grid(OP, x, scale_factor, version)
    return x.new_empty((B, N // (r * r), C * r * r))


def pixel_shuffle(x: Tensor, scale_factor: float = 0.5, version: str = "v2") -> Tensor:
    """Merge each ``r × r`` neighbourhood of the square token grid ``[B, N, C]`` → ``[B, N / r², r²·C]``."""
    return _pixel_shuffle_op(x, float(scale_factor), str(version))


# ---------------------------------------------------------------------------------------- pixel_shuffle_layer_norm
def _check_ln(x, weight, bias, scale_factor, version, eps):
    B, N, C, side, r = _check_grid(OP_LN, x, scale_factor, version)
    check_vector(OP_LN, "weight", weight, C * r * r)
    check_vector(OP_LN, "bias", bias, C * r * r)
    check_same_device(OP_LN, "x", x, weight=weight, bias=bias)
    if not eps >= 0:
        raise ValueError(f"{OP_LN}: eps must be >= 0, got {eps}")
    return B, N, C, side, r


@on_input_device
def pixel_shuffle_layer_norm_triton(x, weight, bias, scale_factor=0.5, version="v2", eps=1e-5):
    B, N, C, side, r = _check_ln(x, weight, bias, scale_factor, version, eps)
    x = _x_rows(x)
    n_out = N // (r * r)
    y = new_empty((B, n_out, C * r * r), x.dtype, x.device)
    if B * n_out == 0:
        return y
    r2p = next_pow2(r * r)
    block_c = next_pow2(C)
    if r2p * block_c > MAX_FUSED_N:
        raise ValueError(f"{OP_LN}: rows of {r * r} x {C} channels exceed the fused kernel's limit of {MAX_FUSED_N}")
    num_warps = max(2, min(16, r2p * block_c // 1024))
    _pixel_shuffle_ln_kernel[(B * n_out,)](
        x, weight if weight is not None else x, bias if bias is not None else x, y, n_out, C, side,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None,
        R=r, R2P=r2p, V2=version == "v2", BLOCK_C=block_c, num_warps=num_warps,
    )
    count_launch(OP_LN)
    return y


def pixel_shuffle_layer_norm_eager(x, weight, bias, scale_factor=0.5, version="v2", eps=1e-5):
    return F_ref.pixel_shuffle_layer_norm(x, weight, bias, scale_factor, version, eps).contiguous()


_backend.register_impl(OP_LN, "eager", pixel_shuffle_layer_norm_eager)
_backend.register_impl(OP_LN, "triton", pixel_shuffle_layer_norm_triton)


@torch.library.custom_op("internvl_kernels::pixel_shuffle_layer_norm", mutates_args=())
def _pixel_shuffle_layer_norm_op(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], scale_factor: float, version: str, eps: float
) -> Tensor:
    _check_ln(x, weight, bias, scale_factor, version, eps)
    return _backend.dispatch(OP_LN, x.device)(x, weight, bias, scale_factor, version, eps)


@_pixel_shuffle_layer_norm_op.register_fake
def _(x, weight, bias, scale_factor, version, eps):
    B, N, C, _, r = _check_ln(x, weight, bias, scale_factor, version, eps)
    return x.new_empty((B, N // (r * r), C * r * r))


def pixel_shuffle_layer_norm(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    scale_factor: float = 0.5,
    version: str = "v2",
    eps: float = 1e-5,
) -> Tensor:
    """``layer_norm(pixel_shuffle(x))`` in one pass from the ViT tokens ``[B, N, C]`` (no shuffled copy)."""
    return _pixel_shuffle_layer_norm_op(x, weight, bias, float(scale_factor), str(version), float(eps))
