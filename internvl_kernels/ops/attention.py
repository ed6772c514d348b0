"""``attention(q, k, v, scale=None)``: non-causal flash attention for InternViT (q/k/v ``[B, S, H, D]``, D ∈ {64, 128}).

Flash-attention-2 style forward: one program owns ``BLOCK_M`` query rows of one (batch, head), streams K/V in
``BLOCK_N`` blocks with an online softmax in fp32 (base-2 exponentials, the scale folded into ``log2 e``), and
never writes the ``S × S`` score matrix. Strided q/k/v are read in place (only the head_dim stride must be 1), so
the views of a packed qkv projection need no copy.

InternViT's sequence is 1025 tokens (1024 patches + cls), one more than a block multiple. Both tails are handled
without wasting a whole block:

* keys: the full ``BLOCK_N`` blocks run unmasked; the remainder is processed in masked ``TAIL_N`` (= 32) slices, so
  the 1025th key costs a 32-wide step instead of a 128-wide one;
* queries: when the remainder of ``S`` after full ``BLOCK_M`` tiles is at most ``BLOCK_M / 2`` it is handled by one
  extra program per (batch, head) in the same launch, with a small tile (``TAIL_M`` ≥ 16 rows), instead of a
  128-row program computing one valid row (or a second, serial launch).

Precision: scores, softmax statistics and the output accumulator are fp32. fp16/bf16 inputs use tensor-core dots
with the probabilities rounded to the input dtype for the ``P @ V`` product (as flash-attention does). fp32 inputs use
IEEE fp32 dots (``input_precision="ieee"``, not TF32): fp32 is the accuracy path, matching PyTorch's default
``allow_tf32=False`` for matmuls. Under the Triton interpreter bf16 operands are upcast to fp32 before the dots
(exact products; the interpreter's bf16 dot is wrong).

The same kernel serves :func:`internvl_kernels.ops.qk_norm_attention` (``QK_NORM`` = 1 or 2): it then reads q, k
and v straight from the packed ``[B, S, 3C]`` projection and applies InternViT's QK-RMSNorm on the fly from
per-token ``rstd`` values computed by a pre-pass over all C channels (see that module for the two modes).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import (
    launch_tuned, on_input_device, register_tuner,
    INTERPRET, autotune_configs, check_float, check_rank, check_same_device, check_same_dtype, count_launch, new_empty,
    next_pow2, tl_dtype, upcast_dots,
)
from ._tl import to_dtype

OP = "attention"
SUPPORTED_HEAD_DIMS = (64, 128)
LOG2E = 1.4426950408889634
TAIL_N = 32


@triton.jit
def _attn_block(
    acc, l_i, m_i, q,
    k_base, v_base, stride_ks, stride_vs, rk_base, stride_rs, wk,
    start_n, S_KV, qk_scale,
    offs_d,
    BLOCK: tl.constexpr,
    MASK: tl.constexpr,
    QK_NORM: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DT: tl.constexpr,
):
    offs_n = start_n + tl.arange(0, BLOCK)
    if MASK:
        nmask = offs_n < S_KV
        kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None], mask=nmask[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=nmask[:, None], other=0.0)
    else:
        kT = tl.load(k_base + offs_n[None, :] * stride_ks + offs_d[:, None])
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :])
    if QK_NORM != 0:
        if MASK:
            rk = tl.load(rk_base + offs_n * stride_rs, mask=nmask, other=1.0)
        else:
            rk = tl.load(rk_base + offs_n * stride_rs)
    if QK_NORM == 2:
        # exact mode: normalize the k tile with the reference's Llama roundings, (k * rstd) -> dtype, * w -> dtype
        kT = to_dtype(kT.to(tl.float32) * rk[None, :], DT).to(tl.float32)
        kT = to_dtype(kT * wk[:, None], DT)
    if UPCAST:
        kT = kT.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        s = tl.dot(q, kT, input_precision="ieee")
    else:
        s = tl.dot(q, kT)
    if QK_NORM == 1:
        # folded mode: w_k already multiplied into q; rstd_k scales the score columns (no work on the k tile)
        s = s * (rk * qk_scale)[None, :]
    else:
        s = s * qk_scale
    if MASK:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if UPCAST:
        acc = tl.dot(to_dtype(p, DT).to(tl.float32), v, acc)
    elif IEEE:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(DT), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attn_tile(
    Q, K, V, O, RSTD, WQ, WK,
    stride_qs, stride_ks, stride_vs, stride_os, stride_rb, stride_rs,
    b, h, m_start, S_Q, S_KV, qk_scale,
    D: tl.constexpr,
    QK_NORM: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr,
):
    """``BLOCK_M`` query rows from ``m_start`` of one (batch, head); Q/K/V/O already point at that (b, h)."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mmask = offs_m < S_Q

    q = tl.load(Q + offs_m[:, None] * stride_qs + offs_d[None, :], mask=mmask[:, None], other=0.0)
    rk_base = RSTD + b * stride_rb + 1  # rstd of k: column 1 of [B, S, 2]
    if QK_NORM != 0:
        # q̂ = (q * rstd_q) -> dtype, * w_q -> dtype: exactly the reference's normalized q
        rq = tl.load(RSTD + b * stride_rb + offs_m * stride_rs, mask=mmask, other=1.0)
        wq = tl.load(WQ + h * D + offs_d).to(tl.float32)
        wk = tl.load(WK + h * D + offs_d).to(tl.float32)
        q = to_dtype(q.to(tl.float32) * rq[:, None], DT).to(tl.float32)
        q = to_dtype(q * wq[None, :], DT)
        if QK_NORM == 1:
            # q̂·k̂_j = rstd_k[j] · ((q̂ ⊙ w_k) · k_j): fold w_k into q once per program
            q = to_dtype(q.to(tl.float32) * wk[None, :], DT)
    else:
        wk = tl.zeros([D], dtype=tl.float32)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)

    n_full = (S_KV // BLOCK_N) * BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q, K, V, stride_ks, stride_vs, rk_base, stride_rs, wk, start_n, S_KV, qk_scale,
            offs_d, BLOCK_N, False, QK_NORM, UPCAST, IEEE, DT,
        )
    for start_n in range(n_full, S_KV, TAIL):
        acc, l_i, m_i = _attn_block(
            acc, l_i, m_i, q, K, V, stride_ks, stride_vs, rk_base, stride_rs, wk, start_n, S_KV, qk_scale,
            offs_d, TAIL, True, QK_NORM, UPCAST, IEEE, DT,
        )

    out = acc / l_i[:, None]
    o_ptrs = O + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, to_dtype(out, O.dtype.element_ty), mask=mmask[:, None])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, RSTD, WQ, WK,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_rb, stride_rs,
    H, S_Q, S_KV, N_MAIN, qk_scale,
    D: tl.constexpr,
    QK_NORM: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    DT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr,
    TAIL_M: tl.constexpr,
):
    """Programs ``0 .. N_MAIN-1`` own full ``BLOCK_M`` query tiles; with ``TAIL_M`` > 0 the last program (``pid_m ==
    N_MAIN``) owns the few rows after them in a ``TAIL_M``-row tile — one launch, no 128-row tile for 1 row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh
    if TAIL_M > 0:
        if pid_m == N_MAIN:
            _attn_tile(q_base, k_base, v_base, o_base, RSTD, WQ, WK, stride_qs, stride_ks, stride_vs, stride_os,
                       stride_rb, stride_rs, b, h, N_MAIN * BLOCK_M, S_Q, S_KV, qk_scale,
                       D, QK_NORM, UPCAST, IEEE, DT, TAIL_M, BLOCK_N, TAIL)
        else:
            _attn_tile(q_base, k_base, v_base, o_base, RSTD, WQ, WK, stride_qs, stride_ks, stride_vs, stride_os,
                       stride_rb, stride_rs, b, h, pid_m * BLOCK_M, S_Q, S_KV, qk_scale,
                       D, QK_NORM, UPCAST, IEEE, DT, BLOCK_M, BLOCK_N, TAIL)
    else:
        _attn_tile(q_base, k_base, v_base, o_base, RSTD, WQ, WK, stride_qs, stride_ks, stride_vs, stride_os,
                   stride_rb, stride_rs, b, h, pid_m * BLOCK_M, S_Q, S_KV, qk_scale,
                   D, QK_NORM, UPCAST, IEEE, DT, BLOCK_M, BLOCK_N, TAIL)


def _gpu_configs():
    cfgs = []
    for bn, nw, ns in ((64, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 2), (128, 8, 3), (128, 4, 3)):
        cfgs.append(triton.Config({"BLOCK_N": bn}, num_warps=nw, num_stages=ns))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Keep the configurations that compile for sm_90 without register spills (``ptxas -v``; listed per config by
    ``python -m internvl_kernels.ops.aot_check --pickable``, asserted by tests/test_triton_spills.py):

    * fp32 (IEEE dots, ``BLOCK_M`` = 32): 8 warps and 64-wide key blocks (4 warps or 128-wide blocks spill; the
      former 64-row tile spilled 23-58 KB in every configuration);
    * 16-bit (``BLOCK_M`` = 128): 8 warps (4 warps spill 16-320 B even at D = 64); at D = 128 only 128-wide key
      blocks with 3 stages (64-wide blocks spill 32-188 B, 2 stages 16 B with the QK-norm), except the exact QK-norm
      mode (``QK_NORM`` = 2, which normalizes every k tile): 64-wide blocks, 3 stages (128-wide ones spill 240 B).
    """
    D = kwargs.get("D", 0)
    if kwargs.get("IEEE"):
        kept = [c for c in configs if c.num_warps == 8 and c.kwargs["BLOCK_N"] == 64]
    elif D >= 128:
        bn = 64 if kwargs.get("QK_NORM") == 2 else 128
        kept = [c for c in configs if c.num_warps == 8 and c.kwargs["BLOCK_N"] == bn and c.num_stages == 3]
    else:
        kept = [c for c in configs if c.num_warps == 8]
    return kept or configs[:1]


_attn_fwd_tuned = triton.autotune(
    configs=autotune_configs(_gpu_configs(), triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=1)),
    key=["S_Q", "S_KV", "D", "QK_NORM", "IEEE"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune},
)(_attn_fwd_kernel)
register_tuner("attention", _attn_fwd_tuned)


def _block_m(dtype: torch.dtype) -> int:
    if INTERPRET:
        return 64
    return 32 if dtype == torch.float32 else 128  # fp32: 64-row tiles spill at D = 128 (see _prune)


def launch_attention(
    op: str, q, k, v, out, B, H, S_q, S_kv, D, scale, *,
    strides_q, strides_k, strides_v, strides_o,
    rstd=None, wq=None, wk=None, qk_norm_mode: int = 1,
):
    """Launch the forward kernel: one grid of full query tiles plus, when the remainder is small, one small-tile
    program per (batch, head) for it (see :func:`query_tiles`)."""
    dtype = q.dtype
    qk_norm = 0 if rstd is None else qk_norm_mode
    if not qk_norm:
        rstd, wq, wk = out, out, out  # never read
        stride_rb = stride_rs = 0
    else:
        stride_rb, stride_rs = rstd.stride(0), rstd.stride(1)
    common = dict(D=D, QK_NORM=qk_norm, UPCAST=upcast_dots(dtype), IEEE=dtype == torch.float32, DT=tl_dtype(dtype),
                  TAIL=TAIL_N)
    args = (q, k, v, out, rstd, wq, wk, *strides_q, *strides_k, *strides_v, *strides_o, stride_rb, stride_rs, H, S_q, S_kv)
    qk_scale = float(scale) * LOG2E
    if B * H == 0 or S_q == 0:
        return out
    bm = _block_m(dtype)
    n_main, tail_m = query_tiles(S_q, bm)
    _launch_main(args, (n_main + (1 if tail_m else 0), B * H), n_main, qk_scale, bm, tail_m, common)
    count_launch(op)
    return out


def query_tiles(S_q: int, block_m: int) -> tuple[int, int]:
    """``(full tiles, tail tile rows)``: a remainder of at most ``block_m / 2`` rows after the full tiles goes to one
    extra program with a small (≥ 16, power-of-two) tile; a larger one to a masked ``block_m`` tile (tail 0)."""
    rem = S_q % block_m
    if rem and rem <= block_m // 2:
        return S_q // block_m, max(16, next_pow2(rem))
    return triton.cdiv(S_q, block_m), 0


def _launch_main(args, grid, n_main, qk_scale, bm, tail_m, common):
    launch_tuned(OP, _attn_fwd_tuned, grid, *args, n_main, qk_scale, BLOCK_M=bm, TAIL_M=tail_m, **common,
                 prune=None if INTERPRET else _prune)


def _check(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, name, t)
        check_rank(OP, name, t, 4)
    check_same_dtype(OP, "q", q, k=k, v=v)
    check_same_device(OP, "q", q, k=k, v=v)
    B, _, H, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D:
        raise ValueError(f"{OP}: q is [B={B}, S, H={H}, D={D}] but k/v are {tuple(k.shape)}; batch, heads and "
                         "head_dim must match")
    if scale is not None and not scale > 0:
        raise ValueError(f"{OP}: scale must be positive, got {scale}")


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@on_input_device
def attention_triton(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    B, S_q, H, D = q.shape
    S_kv = k.shape[1]
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{OP}: head_dim {D} is not supported by the Triton kernel (supported: "
                         f"{SUPPORTED_HEAD_DIMS}); use internvl_kernels.set_backend('eager') for other sizes")
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = new_empty((B, S_q, H, D), q.dtype, q.device)
    if S_kv == 0:
        raise ValueError(f"{OP}: k/v have no tokens (S_kv = 0)")
    scale = D ** -0.5 if scale is None else scale
    return launch_attention(
        OP, q, k, v, out, B, H, S_q, S_kv, D, scale,
        strides_q=(q.stride(0), q.stride(1), q.stride(2)), strides_k=(k.stride(0), k.stride(1), k.stride(2)),
        strides_v=(v.stride(0), v.stride(1), v.stride(2)), strides_o=(out.stride(0), out.stride(1), out.stride(2)),
    )


def attention_eager(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    return F_ref.attention(q, k, v, scale).contiguous()


_backend.register_impl(OP, "eager", attention_eager)
_backend.register_impl(OP, "triton", attention_triton)


@torch.library.custom_op("internvl_kernels::attention", mutates_args=())
def _attention_op(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float]) -> Tensor:
    _check(q, k, v, scale)
    return _backend.dispatch(OP, q.device)(q, k, v, scale)


@_attention_op.register_fake
def _(q, k, v, scale):
    _check(q, k, v, scale)
    return q.new_empty(q.shape)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Non-causal softmax attention; q ``[B, Sq, H, D]``, k/v ``[B, Skv, H, D]`` → ``[B, Sq, H, D]``.

    ``scale`` defaults to ``D ** -0.5``.
    """
    return _attention_op(q, k, v, None if scale is None else float(scale))
