"""``qk_norm_attention(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale=None)``: InternViT-6B attention.

Input: the packed qkv projection ``[B, S, 3C]`` (laid out ``(3, heads, head_dim)``). InternViT RMS-normalizes q and
k over **all C channels** (3200, not per head) before splitting heads, which no stock attention kernel fuses. Here:

1. a pre-pass reads the q and k halves of each token once and writes two fp32 ``rstd`` values per token
   (``[B, S, 2]``, 8 bytes per token instead of a normalized ``2·C`` copy);
2. the flash-attention kernel (:mod:`.attention`) reads q, k, v straight out of the packed buffer. Each program
   normalizes its q tile once, with the reference's two Llama roundings: ``q̂ = round(round(q · rstd_q) · w_q)``.
   For k there are two modes:

   * ``fold`` (default): since ``q̂ · k̂_j = rstd_k[j] · ((q̂ ⊙ w_k) · k_j)``, ``w_k`` is folded into the q tile
     (one more rounding, once per program) and ``rstd_k`` scales the score columns together with the softmax
     scale — the streamed k tiles are used raw, so the inner loop does no extra per-element work. **Deviation**:
     the reference rounds ``k · rstd_k`` and ``· w_k`` to the input dtype; here k is unrounded and the rounding
     sits on the ``q̂ ⊙ w_k`` side instead. Same error magnitude (one dtype rounding per operand product); the
     tests hold it to the flash-attention rule.
   * ``exact`` (``qk_norm="exact"``, :func:`internvl_kernels.options.set_qk_norm`): every k tile is normalized as it streams by with the
     reference's two roundings, so the dots see exactly the reference's normalized q and k (≈ one extra
     elementwise pass over each k tile per query block: slower, for verification).

Nothing of size ``S × C`` is written besides the output ``[B, S, C]``. The other difference from the eager
reference is the flash-attention one (fp32 scores/softmax instead of rounding them to the input dtype), which the
tests bound with the flash-attention rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend, options
from ..model import functional as F_ref
from ._common import (
    on_input_device,
    check_float, check_rank, check_same_device, check_same_dtype, check_vector, count_launch, new_empty,
    next_pow2,
)
from .attention import SUPPORTED_HEAD_DIMS, launch_attention

OP = "qk_norm_attention"
MODES = {"fold": 1, "exact": 2}


def qk_norm_mode(qk_norm: str | None = None) -> str:
    """``qk_norm`` validated; ``None`` → the process default (:func:`internvl_kernels.options.set_qk_norm`)."""
    return options.check_qk_norm(qk_norm)


@triton.jit
def _qk_rstd_kernel(
    QKV, RSTD, M, C, stride_row, eps,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols[None, :] < C)
    base = QKV + rows[:, None] * stride_row + cols[None, :]
    q = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(base + C, mask=mask, other=0.0).to(tl.float32)
    rq = tl.rsqrt(tl.sum(q * q, axis=1) / C + eps)
    rk = tl.rsqrt(tl.sum(k * k, axis=1) / C + eps)
    tl.store(RSTD + rows * 2, rq, mask=rmask)
    tl.store(RSTD + rows * 2 + 1, rk, mask=rmask)


def _check(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale):
    check_float(OP, "qkv", qkv)
    check_rank(OP, "qkv", qkv, 3)
    C3 = qkv.shape[-1]
    if C3 % 3:
        raise ValueError(f"{OP}: the last dim of qkv ({C3}) must be 3 * C (packed q, k, v)")
    C = C3 // 3
    if num_heads <= 0 or C % num_heads:
        raise ValueError(f"{OP}: C = {C} channels do not split into num_heads = {num_heads} heads")
    check_vector(OP, "q_norm_weight", q_norm_weight, C)
    check_vector(OP, "k_norm_weight", k_norm_weight, C)
    check_same_dtype(OP, "qkv", qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    check_same_device(OP, "qkv", qkv, q_norm_weight=q_norm_weight, k_norm_weight=k_norm_weight)
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be positive, got {scale}")


def qk_rstd(qkv: Tensor, eps: float) -> Tensor:
    """The pre-pass alone: ``[B, S, 2]`` fp32 rsqrt(mean(q²) + eps), rsqrt(mean(k²) + eps) per token."""
    B, S, C3 = qkv.shape
    C = C3 // 3
    M = B * S
    rstd = new_empty((B, S, 2), torch.float32, qkv.device)
    if M == 0:
        return rstd
    block_c = next_pow2(C)
    block_m = max(1, min(next_pow2(M), 2048 // block_c))
    num_warps = max(2, min(16, block_m * block_c // 512))
    _qk_rstd_kernel[(triton.cdiv(M, block_m),)](
        qkv, rstd, M, C, qkv.stride(1), float(eps), BLOCK_M=block_m, BLOCK_C=block_c, num_warps=num_warps,
    )
    count_launch(OP)
    return rstd


@on_input_device
def qk_norm_attention_triton(qkv, q_norm_weight, k_norm_weight, num_heads, eps=1e-6, scale=None, qk_norm=None):
    B, S, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{OP}: head_dim {D} (C={C} / {num_heads} heads) is not supported by the Triton kernel "
                         f"(supported: {SUPPORTED_HEAD_DIMS}); use internvl_kernels.set_backend('eager')")
    # rows must be addressable as [B*S, row_stride] with unit channel stride (true for a Linear's output)
    if qkv.stride(-1) != 1 or qkv.stride(1) < C3 or (B > 1 and qkv.stride(0) != S * qkv.stride(1)):
        qkv = qkv.contiguous()
    q_norm_weight = q_norm_weight.contiguous()
    k_norm_weight = k_norm_weight.contiguous()
    out = new_empty((B, S, C), qkv.dtype, qkv.device)
    if B * S == 0:
        return out
    rstd = qk_rstd(qkv, eps)
    scale = D ** -0.5 if scale is None else scale
    sb, ss = qkv.stride(0), qkv.stride(1)
    strides = (sb, ss, D)
    launch_attention(
        OP, qkv, qkv[..., C:], qkv[..., 2 * C:], out, B, num_heads, S, S, D, scale,
        strides_q=strides, strides_k=strides, strides_v=strides, strides_o=(out.stride(0), out.stride(1), D),
        rstd=rstd, wq=q_norm_weight, wk=k_norm_weight, qk_norm_mode=MODES[qk_norm_mode(qk_norm)],
    )
    return out


def qk_norm_attention_eager(qkv, q_norm_weight, k_norm_weight, num_heads, eps=1e-6, scale=None, qk_norm=None):
    # the reference applies the norm with its own roundings: ``qk_norm`` (a Triton kernel choice) does not apply
    return F_ref.qk_norm_attention(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale).contiguous()


_backend.register_impl(OP, "eager", qk_norm_attention_eager)
_backend.register_impl(OP, "triton", qk_norm_attention_triton)


@torch.library.custom_op("internvl_kernels::qk_norm_attention", mutates_args=())
def _qk_norm_attention_op(
    qkv: Tensor, q_norm_weight: Tensor, k_norm_weight: Tensor, num_heads: int, eps: float, scale: Optional[float],
    qk_norm: str,
) -> Tensor:
    _check(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale)
    return _backend.dispatch(OP, qkv.device)(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale, qk_norm)


@_qk_norm_attention_op.register_fake
def _(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale, qk_norm):
    _check(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale)
    B, S, C3 = qkv.shape
    return qkv.new_empty((B, S, C3 // 3))


def qk_norm_attention(
    qkv: Tensor,
    q_norm_weight: Tensor,
    k_norm_weight: Tensor,
    num_heads: int,
    eps: float = 1e-6,
    scale: Optional[float] = None,
    qk_norm: Optional[str] = None,
) -> Tensor:
    """InternViT attention from packed qkv ``[B, S, 3C]`` with QK-RMSNorm over all C channels → ``[B, S, C]``.

    ``qk_norm`` — how the Triton kernel applies the k normalization: ``"fold"`` or ``"exact"`` (``None``: the
    process default, :func:`internvl_kernels.options.set_qk_norm`). The eager reference and the CUDA kernel always
    apply the reference's own roundings."""
    return _qk_norm_attention_op(qkv, q_norm_weight, k_norm_weight, int(num_heads), float(eps),
                                 None if scale is None else float(scale), qk_norm_mode(qk_norm))
