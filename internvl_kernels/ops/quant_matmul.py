"""``quant_matmul``: weight-only quantized GEMM (W2/3/4/8 A16) on GPTQ v1 / gptq_v2 / AWQ-GEMM packed weights.

``y = x @ W.T (+ bias)`` with ``W[n, k] = (q[k, n] - zero[g(k), n]) * scale[g(k), n]`` dequantized from the packed
checkpoint tensors exactly as :mod:`internvl_kernels.quant.formats` defines them (docs/design.md §2). Output in ``x.dtype``; products are
accumulated in fp32.

``layout`` selects the packing *and* the zero convention:

* ``"gptq"``    — GPTQ v1 (AutoGPTQ): ``qweight`` int32 ``[K*bits/32, N]`` packed along K, ``qzeros`` int32
  ``[G, N*bits/32]`` holding **zero − 1** (the kernel adds 1 back, unmasked, like AutoGPTQ's kernels).
* ``"gptq_v2"`` — same packing, ``qzeros`` hold the true zero (GPTQModel's ``checkpoint_format: gptq_v2``).
* ``"awq"``     — AWQ GEMM: ``qweight`` int32 ``[K, N/8]``, ``qzeros`` ``[G, N/8]`` (true zero), nibble order
  ``[0, 2, 4, 6, 1, 3, 5, 7]``; 4-bit only; no ``g_idx`` (groups contiguous).

``scales`` ``[G, N]`` (fp16 on disk; bf16/fp32 accepted — always converted to fp32 in-kernel, so bf16 activations
never go through fp16), ``g_idx`` int32 ``[K]`` (GPTQ act-order; ``None`` = ``k // group_size``), ``group_size`` −1
for one group. ``G = ceil(K / group_size)``.

Implementations (selected by :mod:`internvl_kernels._backend`):

* ``eager``  — unpack with :mod:`internvl_kernels.quant.formats` → dequantize in fp32 → ``x.float() @ W.T`` → ``x.dtype``
  (:func:`internvl_kernels.model.functional.quant_matmul`, the definition the kernels are tested against).
* ``triton`` — two kernels sharing the same in-register unpack:

  - **split-K decode kernel** (M ≤ ``SPLITK_MAX_M``): grid ``(N/BN, SPLIT_K, M/BM)``; each program reads a K-slice of
    the packed weight once. Without act-order every K-tile lies in one quantization group and the group's scale and
    zero are applied to the small ``[BM, BN]`` accumulator instead of every weight:
    ``acc += (x_tile @ q_tile − rowsum(x_tile) ⊗ zero) * scale`` — integer codes are exact in fp16/bf16, so the
    only rounding is the fp32 accumulation (more accurate than dequantize-then-round, and ~half the ALU work per
    weight). With act-order it dequantizes per element (gathered scales/zeros). ``SPLIT_K > 1`` writes fp32 partials
    ``[SPLIT_K, M, N]`` and a second small kernel sums them **in a fixed order** and adds the bias: results are
    deterministic run to run (no atomics).
  - **tiled GEMM kernel** (prefill, the ViT): ``(M/BM)·(N/BN)`` programs in grouped order; each K-step dequantizes
    the ``[BK, BN]`` weight tile in registers (fp32 math, then rounded to ``x.dtype``) and feeds ``tl.dot``
    (tensor cores) with an fp32 accumulator; bias and the cast in the epilogue. Deterministic.

  2/3/4/8 bits in both (3-bit reads AutoGPTQ's straddling bit stream per element). Under ``TRITON_INTERPRET`` one
  autotune config per kernel and bf16 operands are upcast to fp32 before ``tl.dot`` (the interpreter's bf16 is wrong).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import _backend
from ..model import functional as F_ref
from ..quant import formats
from ._common import INTERPRET, count_launch, new_empty, next_pow2
from ._common import launch_tuned, on_input_device, register_tuner

OP = "quant_matmul"
LAYOUTS = formats.FORMATS
SUPPORTED_BITS = formats.SUPPORTED_BITS
_LAYOUT_ID = {"gptq": 0, "gptq_v2": 1, "awq": 2}
SPLITK_MAX_M = 32  # rows handled by the split-K decode kernel; larger M goes to the tiled GEMM kernel
# Without act-order the kernels apply one group's scale/zero per K-tile; that needs BK | group_size, and every config
# has BK >= 32 (the interpreter's single config has BK = 32), so other group sizes take the per-element gather path.
ALIGNED_MIN_BK = 32

# only the op is re-exported by internvl_kernels.ops; the helpers stay importable from this module
__all__ = ["quant_matmul"]


# ---------------------------------------------------------------------------------------------------------------
# shapes + validation (metadata only: runs on fake tensors under torch.compile as well)
# ---------------------------------------------------------------------------------------------------------------
def _effective_group_size(group_size: int, K: int) -> int:
    try:
        return formats.effective_group_size(group_size, K)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{OP}: {e}") from None


def packed_shapes(in_features: int, out_features: int, bits: int, group_size: int, layout: str) -> dict:
    """Shapes of the checkpoint tensors of one quantized Linear ``[out, in]`` (:func:`formats.packed_shapes`)."""
    try:
        return formats.get_format(layout).packed_shapes(in_features, out_features, bits, group_size)
    except ValueError as e:
        raise ValueError(f"{OP}: {e}") from None


def check_quant_matmul_args(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout) -> tuple[int, int, int]:
    """Validate the op's arguments; returns ``(K, N, effective_group_size)``.

    Raises a clear error naming the problem."""
    from ._common import FLOAT_DTYPES

    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{OP}: layout must be one of {LAYOUTS} ('gptq' = GPTQ v1 zero-1 convention, 'gptq_v2' = "
                         f"true zeros, 'awq' = AWQ GEMM), got {layout!r}")
    fmt = formats.get_format(layout)
    why = fmt.bits_reason(bits)
    if why:
        raise ValueError(f"{OP}: {why}")
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("qzeros", qzeros)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{OP}: x has dtype {x.dtype}; supported are float16, bfloat16, float32")
    if x.dim() < 1:
        raise ValueError(f"{OP}: x must have at least one dimension [..., in_features]")
    for name, t in (("qweight", qweight), ("qzeros", qzeros)):
        if t.dtype != torch.int32:
            raise TypeError(f"{OP}: {name} must be int32 (packed), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{OP}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if scales.dtype not in FLOAT_DTYPES or scales.dim() != 2:
        raise TypeError(f"{OP}: scales must be a 2-D float tensor [groups, out_features] (fp16 on disk), got "
                        f"{scales.dtype} {tuple(scales.shape)}")
    K = x.shape[-1]
    N = scales.shape[1]
    gs = _effective_group_size(group_size, K)
    try:
        want = packed_shapes(K, N, bits, group_size, layout)
    except ValueError as e:
        raise ValueError(f"{e} (in_features taken from x.shape[-1]={K}, "
                         f"out_features from scales.shape[1]={N})") from None
    for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if tuple(t.shape) != want[name]:
            raise ValueError(f"{OP}: {name} has shape {tuple(t.shape)} but layout={layout!r}, bits={bits}, "
                             f"group_size={group_size} with in_features={K} (x.shape[-1]) and out_features={N} "
                             f"(scales.shape[1]) needs {want[name]}")
    if g_idx is not None:
        if not fmt.has_g_idx:
            raise ValueError(f"{OP}: AWQ has no g_idx (groups are contiguous); pass g_idx=None")
        if not isinstance(g_idx, torch.Tensor) or g_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: g_idx must be an int32 (or int64) tensor [in_features], got "
                            f"{getattr(g_idx, 'dtype', type(g_idx).__name__)}")
        if tuple(g_idx.shape) != (K,):
            raise ValueError(f"{OP}: g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{OP}: bias must be a float tensor [out_features]")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{OP}: bias must have shape ({N},), got {tuple(bias.shape)}")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("g_idx", g_idx), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    for name, t in (("qweight", qweight), ("scales", scales), ("qzeros", qzeros), ("g_idx", g_idx), ("bias", bias)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{OP}: {name} must be contiguous (call .contiguous() once at load time)")
    return K, N, gs


# ---------------------------------------------------------------------------------------------------------------
# eager implementation (the reference)
# ---------------------------------------------------------------------------------------------------------------
def _quant_matmul_eager(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    return F_ref.quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, layout, bias=bias)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - platform without triton
    triton = None

if triton is not None:

    @triton.jit
    def _load_codes(QW, k0, n_start, K, N, stride_qw,
                    BITS: tl.constexpr, IS_AWQ: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
        """Integer codes ``q[k0:k0+BK, n_start:n_start+BN]`` (int32, ``[BK, BN]``) from the packed weight.

        Out-of-range rows/columns read 0 (callers zero the matching activations / scales)."""
        MASKV: tl.constexpr = (1 << BITS) - 1
        offs_n = n_start + tl.arange(0, BN)
        if IS_AWQ:
            # qweight [K, N/8]; nibble i of packed column c holds output column 8c + [0,2,4,6,1,3,5,7][i]
            offs_k = k0 + tl.arange(0, BK)
            cols = n_start // 8 + tl.arange(0, BN // 8)
            msk = (offs_k[:, None] < K) & (cols[None, :] < N // 8)
            p = tl.load(QW + offs_k[:, None] * stride_qw + cols[None, :], mask=msk, other=0)
            j = tl.arange(0, 8)
            sh = ((j // 2) + (j % 2) * 4) * 4
            q = (p[:, :, None] >> sh[None, None, :]) & 0xF
            q = tl.reshape(q, (BK, BN))
        elif BITS == 3:
            # continuous little-endian bit stream along K; values 10 and 21 of every 32 straddle two words
            offs_k = k0 + tl.arange(0, BK)
            bit = offs_k * 3
            word = bit // 32
            sh = bit % 32
            kmask = offs_k < K
            nmask = offs_n < N
            m2 = kmask[:, None] & nmask[None, :]
            lo = tl.load(QW + word[:, None] * stride_qw + offs_n[None, :], mask=m2, other=0)
            straddle = sh > 29
            hi = tl.load(QW + (word + 1)[:, None] * stride_qw + offs_n[None, :],
                         mask=m2 & straddle[:, None], other=0)
            lo = lo.to(tl.uint32, bitcast=True)
            hi = hi.to(tl.uint32, bitcast=True)
            hsh = tl.where(straddle, 32 - sh, 0)
            v = (lo >> sh[:, None].to(tl.uint32)) | tl.where(straddle[:, None], hi << hsh[:, None].to(tl.uint32), 0)
            q = (v & 7).to(tl.int32)
        else:
            PACK: tl.constexpr = 32 // BITS
            rows = k0 // PACK + tl.arange(0, BK // PACK)
            msk = (rows[:, None] < K // PACK) & (offs_n[None, :] < N)
            p = tl.load(QW + rows[:, None] * stride_qw + offs_n[None, :], mask=msk, other=0)
            sh = tl.arange(0, PACK) * BITS
            q = (p[:, None, :] >> sh[None, :, None]) & MASKV
            q = tl.reshape(q, (BK, BN))
        return q

    @triton.jit
    def _load_zeros(QZ, g, n, msk, stride_qz, BITS: tl.constexpr, LAYOUT: tl.constexpr):
        """True zero points at group(s) ``g`` and column(s) ``n`` (broadcastable index tensors) → int32."""
        MASKV: tl.constexpr = (1 << BITS) - 1
        if LAYOUT == 2:  # AWQ order
            j = n % 8
            sh = ((j // 2) + (j % 2) * 4) * 4
            p = tl.load(QZ + g * stride_qz + n // 8, mask=msk, other=0)
            z = (p >> sh) & 0xF
        elif BITS == 3:
            bit = n * 3
            word = bit // 32
            sh = bit % 32
            straddle = sh > 29
            lo = tl.load(QZ + g * stride_qz + word, mask=msk, other=0).to(tl.uint32, bitcast=True)
            hi = tl.load(QZ + g * stride_qz + word + 1, mask=msk & straddle, other=0).to(tl.uint32, bitcast=True)
            hsh = tl.where(straddle, 32 - sh, 0)
            v = (lo >> sh.to(tl.uint32)) | tl.where(straddle, hi << hsh.to(tl.uint32), 0)
            z = (v & 7).to(tl.int32)
        else:
            PACK: tl.constexpr = 32 // BITS
            p = tl.load(QZ + g * stride_qz + n // PACK, mask=msk, other=0)
            z = (p >> ((n % PACK) * BITS)) & MASKV
        if LAYOUT == 0:  # GPTQ v1 stores zero - 1; AutoGPTQ's kernels add 1 back without masking
            z = z + 1
        return z

    @triton.jit
    def _dequant_gather(QW, SC, QZ, GI, k0, n_start, K, N, group_size, stride_qw, stride_sc, stride_qz,
                        BITS: tl.constexpr, LAYOUT: tl.constexpr, HAS_GIDX: tl.constexpr,
                        BK: tl.constexpr, BN: tl.constexpr):
        """Dequantized fp32 tile ``W.T[k0:k0+BK, n_start:n_start+BN]`` with a per-row group (act-order / any size)."""
        q = _load_codes(QW, k0, n_start, K, N, stride_qw, BITS, LAYOUT == 2, BK, BN)
        offs_k = k0 + tl.arange(0, BK)
        offs_n = n_start + tl.arange(0, BN)
        kmask = offs_k < K
        if HAS_GIDX:
            g = tl.load(GI + offs_k, mask=kmask, other=0).to(tl.int32)
        else:
            g = offs_k // group_size
        m2 = kmask[:, None] & (offs_n[None, :] < N)
        z = _load_zeros(QZ, g[:, None], offs_n[None, :], m2, stride_qz, BITS, LAYOUT)
        s = tl.load(SC + g[:, None] * stride_sc + offs_n[None, :], mask=m2, other=0.0).to(tl.float32)
        return (q - z).to(tl.float32) * s

    @triton.jit
    def _dequant_aligned(QW, SC, QZ, k0, n_start, K, N, group_size, stride_qw, stride_sc, stride_qz,
                         BITS: tl.constexpr, LAYOUT: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr):
        """Same as :func:`_dequant_gather` when the whole K-tile lies in one group (``BK | group_size``)."""
        q = _load_codes(QW, k0, n_start, K, N, stride_qw, BITS, LAYOUT == 2, BK, BN)
        offs_n = n_start + tl.arange(0, BN)
        nmask = offs_n < N
        g = k0 // group_size
        z = _load_zeros(QZ, g, offs_n, nmask, stride_qz, BITS, LAYOUT)
        s = tl.load(SC + g * stride_sc + offs_n, mask=nmask, other=0.0).to(tl.float32)
        return (q - z[None, :]).to(tl.float32) * s[None, :]

    # ----------------------------------------------------------------------------------------------- decode
    @triton.jit
    def _qmm_splitk_kernel(X, QW, SC, QZ, GI, BIAS, OUT, PART,
                           M, N, K, group_size, SPLIT_K,
                           stride_xm, stride_om, stride_qw, stride_sc, stride_qz, M_BUCKET,
                           BITS: tl.constexpr, LAYOUT: tl.constexpr, GATHER: tl.constexpr, HAS_GIDX: tl.constexpr,
                           HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        mmask = offs_m < M
        n_start = pid_n * BN
        offs_n = n_start + tl.arange(0, BN)
        nmask = offs_n < N
        tiles = tl.cdiv(K, BK)
        per = tl.cdiv(tiles, SPLIT_K)
        t0 = pid_k * per
        n_t = tl.minimum(per, tiles - t0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for t in range(0, n_t):
            k0 = (t0 + t) * BK
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mmask[:, None] & (offs_k[None, :] < K), other=0.0)
            if GATHER:
                w = _dequant_gather(QW, SC, QZ, GI, k0, n_start, K, N, group_size, stride_qw, stride_sc, stride_qz,
                                    BITS, LAYOUT, HAS_GIDX, BK, BN)
                if DOT_F32:
                    acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, w.to(a.dtype), acc)
            else:
                # one group per tile: apply zero and scale to the [BM, BN] partial product, not to every weight
                q = _load_codes(QW, k0, n_start, K, N, stride_qw, BITS, LAYOUT == 2, BK, BN)
                g = k0 // group_size
                z = _load_zeros(QZ, g, offs_n, nmask, stride_qz, BITS, LAYOUT).to(tl.float32)
                s = tl.load(SC + g * stride_sc + offs_n, mask=nmask, other=0.0).to(tl.float32)
                if DOT_F32:
                    af = a.to(tl.float32)
                    part = tl.dot(af, q.to(tl.float32), input_precision="ieee")
                else:
                    af = a.to(tl.float32)
                    part = tl.dot(a, q.to(a.dtype))  # codes < 256 are exact in fp16 / bf16
                xs = tl.sum(af, axis=1)
                acc += (part - xs[:, None] * z[None, :]) * s[None, :]
        if WRITE_PARTIAL:
            pp = PART + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
            tl.store(pp, acc, mask=mmask[:, None] & nmask[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
            op = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
            tl.store(op, acc.to(OUT.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _splitk_reduce_kernel(PART, BIAS, OUT, MN, N, SPLIT_K, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        msk = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, SPLIT_K):  # fixed order: deterministic
            acc += tl.load(PART + s * MN + offs, mask=msk, other=0.0)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs % N, mask=msk, other=0.0).to(tl.float32)
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=msk)

    # ------------------------------------------------------------------------------------------------ GEMM
    @triton.jit
    def _qmm_gemm_kernel(X, QW, SC, QZ, GI, BIAS, OUT,
                         M, N, K, group_size,
                         stride_xm, stride_om, stride_qw, stride_sc, stride_qz, M_BUCKET,
                         BITS: tl.constexpr, LAYOUT: tl.constexpr, GATHER: tl.constexpr, HAS_GIDX: tl.constexpr,
                         HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        width = GROUP_M * num_n
        group_id = pid // width
        first_m = group_id * GROUP_M
        gsz = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % gsz
        pid_n = (pid % width) // gsz
        offs_m = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
        mmask = offs_m < M
        n_start = pid_n * BN
        offs_n = n_start + tl.arange(0, BN)
        nmask = offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            a = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=mmask[:, None] & (offs_k[None, :] < K), other=0.0)
            if GATHER:
                w = _dequant_gather(QW, SC, QZ, GI, k0, n_start, K, N, group_size, stride_qw, stride_sc, stride_qz,
                                    BITS, LAYOUT, HAS_GIDX, BK, BN)
            else:
                w = _dequant_aligned(QW, SC, QZ, k0, n_start, K, N, group_size, stride_qw, stride_sc, stride_qz,
                                     BITS, LAYOUT, BK, BN)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        op = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(op, acc.to(OUT.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])

    # ------------------------------------------------------------------------------------------------ configs
    def _cfg(num_warps, num_stages, **kw):
        return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)

    # H100 (sm_90) candidates. Decode: the packed weight is the whole traffic -> many CTAs (split-K) and deep
    # pipelines; BN=128 columns of int32 = 512 B contiguous per packed row. GEMM: 128x128/128x256 tiles, 8 warps.
    _SPLITK_GPU = [
        _cfg(4, 3, BN=128, BK=64), _cfg(4, 4, BN=128, BK=64), _cfg(4, 5, BN=128, BK=64),
        _cfg(4, 3, BN=128, BK=128), _cfg(4, 4, BN=128, BK=128), _cfg(8, 3, BN=128, BK=128),
        _cfg(8, 4, BN=128, BK=128), _cfg(4, 2, BN=128, BK=256), _cfg(8, 3, BN=128, BK=256),
        _cfg(4, 4, BN=128, BK=32),
    ]
    _SPLITK_INTERP = _cfg(4, 1, BN=32, BK=32)
    _GEMM_GPU = [
        _cfg(8, 3, BM=128, BN=128, BK=64, GROUP_M=8), _cfg(8, 4, BM=128, BN=128, BK=64, GROUP_M=8),
        _cfg(8, 3, BM=128, BN=256, BK=64, GROUP_M=8), _cfg(8, 3, BM=256, BN=128, BK=64, GROUP_M=8),
        _cfg(4, 4, BM=64, BN=128, BK=64, GROUP_M=8), _cfg(4, 4, BM=64, BN=256, BK=64, GROUP_M=8),
        _cfg(8, 3, BM=128, BN=128, BK=128, GROUP_M=8), _cfg(4, 4, BM=64, BN=64, BK=64, GROUP_M=8),
        _cfg(4, 4, BM=128, BN=64, BK=32, GROUP_M=8), _cfg(4, 5, BM=64, BN=128, BK=32, GROUP_M=8),
    ]
    _GEMM_INTERP = _cfg(4, 1, BM=32, BN=32, BK=32, GROUP_M=4)

    def _prune(configs, named_args, **kwargs):
        """Aligned (non-gather) mode needs every K-tile inside one group: BK | group_size (or one group)."""
        args = {**named_args, **kwargs}
        gs, K, gather, bits = args["group_size"], args["K"], args["GATHER"], args["BITS"]
        out, seen = [], set()
        for c in configs:
            kw = dict(c.kwargs)
            bk = kw["BK"]
            if not gather and gs < K:
                while bk > ALIGNED_MIN_BK and gs % bk:
                    bk //= 2
                if gs % bk:
                    continue
            kw["BK"] = bk
            key = (tuple(sorted(kw.items())), c.num_warps, c.num_stages)
            if key in seen:
                continue
            seen.add(key)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
        if not out:  # the wrapper only chooses aligned mode when a BK fits; keep a safe config anyway
            raise RuntimeError(f"{OP}: no kernel configuration fits group_size={gs}")
        return out

    _KEY = ["M_BUCKET", "N", "K", "group_size", "BITS", "LAYOUT", "GATHER", "HAS_GIDX", "HAS_BIAS", "DOT_F32"]
    _qmm_splitk = triton.autotune(
        configs=[_SPLITK_INTERP] if INTERPRET else _SPLITK_GPU, key=_KEY + ["WRITE_PARTIAL", "BM"],
        prune_configs_by={"early_config_prune": _prune})(_qmm_splitk_kernel)
    _qmm_gemm = triton.autotune(
        configs=[_GEMM_INTERP] if INTERPRET else _GEMM_GPU, key=_KEY,
        prune_configs_by={"early_config_prune": _prune})(_qmm_gemm_kernel)
    register_tuner("quant_matmul.splitk", _qmm_splitk)
    register_tuner("quant_matmul.gemm", _qmm_gemm)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_split_k(M: int, N: int, K: int, BM: int, device) -> int:
    if INTERPRET or device.type != "cuda":
        return 2 if K >= 128 else 1  # exercise the two-stage reduce under the interpreter
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    tiles = -(-N // 128) * -(-M // BM)
    if tiles >= sms:
        return 1
    return int(max(1, min(-(-2 * sms // tiles), K // 512, 16)))


_CHECKED_G_IDX: dict = {}  # id(g_idx) -> (weakref, _version, n_groups, numel): tensors already range-checked


def check_g_idx_range(g_idx: torch.Tensor | None, n_groups: int) -> None:
    """``g_idx`` values must lie in ``[0, n_groups)`` (the kernels index the scales / zeros with them, unmasked).

    The eager reference checks this on every call; the Triton / CUDA paths call this first. A tensor is checked once
    and remembered (by identity and in-place version counter, so an edited tensor is checked again): the
    per-layer ``g_idx`` buffers of a model cost one device sync each, not one per forward.
    """
    if g_idx is None or g_idx.numel() == 0:
        return
    import weakref

    key = id(g_idx)
    hit = _CHECKED_G_IDX.get(key)
    if hit is not None and hit[0]() is g_idx and hit[1:] == (g_idx._version, n_groups, g_idx.numel()):
        return
    lo, hi = (int(v) for v in torch.aminmax(g_idx))
    if lo < 0 or hi >= n_groups:
        raise ValueError(f"{OP}: g_idx values must lie in [0, {n_groups}) (the scales have {n_groups} groups), "
                         f"got [{lo}, {hi}]")
    if len(_CHECKED_G_IDX) > 4096:
        _CHECKED_G_IDX.clear()
    try:
        _CHECKED_G_IDX[key] = (weakref.ref(g_idx), g_idx._version, n_groups, g_idx.numel())
    except TypeError:  # pragma: no cover - a tensor subclass without weakref support: just re-check next time
        pass


@on_input_device
def quant_matmul_triton(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout, *,
                        kernel: str | None = None, split_k: int | None = None):
    """The Triton implementation on a 2-D ``x [M, K]``. ``kernel`` ("splitk" | "gemm") and ``split_k`` override the
    heuristics (tests use them to exercise both kernels at any M)."""
    if triton is None:  # pragma: no cover
        raise RuntimeError(f"{OP}: triton is not installed")
    check_g_idx_range(g_idx, scales.shape[0])
    M, K = x.shape
    N = scales.shape[1]
    gs = K if group_size in (-1, 0) else group_size
    out = new_empty((M, N), x.dtype, x.device)
    if M == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    layout_id = _LAYOUT_ID[layout]
    has_gidx = g_idx is not None
    gather = has_gidx or not (gs >= K or gs % ALIGNED_MIN_BK == 0)
    dot_f32 = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
    gi = g_idx if has_gidx else qweight  # dummy pointer when unused
    bias_t = bias if bias is not None else scales
    if kernel is None:
        kernel = "splitk" if M <= SPLITK_MAX_M else "gemm"
    common = dict(BITS=bits, LAYOUT=layout_id, GATHER=gather, HAS_GIDX=has_gidx, HAS_BIAS=bias is not None,
                  DOT_F32=dot_f32)
    if kernel == "splitk":
        BM = 16 if M <= 16 else 32 if M <= 32 else 64
        sk = split_k if split_k is not None else _choose_split_k(M, N, K, BM, x.device)
        sk = max(1, int(sk))
        part = new_empty((sk, M, N), torch.float32, x.device) if sk > 1 else out
        grid = lambda META: (triton.cdiv(N, META["BN"]), sk, triton.cdiv(M, BM))  # noqa: E731
        launch_tuned(OP, _qmm_splitk, grid, x, qweight, scales, qzeros, gi, bias_t, out, part,
                     M, N, K, gs, sk,
                     x.stride(0), out.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0),
                     next_pow2(M), WRITE_PARTIAL=sk > 1, BM=BM, **common, prune=_prune)
        count_launch(OP)
        if sk > 1:
            BLOCK = 1024
            _splitk_reduce_kernel[(triton.cdiv(M * N, BLOCK),)](part, bias_t, out, M * N, N, sk,
                                                               HAS_BIAS=bias is not None, BLOCK=BLOCK)
            count_launch(OP)
    elif kernel == "gemm":
        grid = lambda META: (triton.cdiv(M, META["BM"]) * triton.cdiv(N, META["BN"]),)  # noqa: E731
        launch_tuned(OP, _qmm_gemm, grid, x, qweight, scales, qzeros, gi, bias_t, out,
                     M, N, K, gs,
                     x.stride(0), out.stride(0), qweight.stride(0), scales.stride(0), qzeros.stride(0),
                     next_pow2(M), **common, prune=_prune)
        count_launch(OP)
    else:
        raise ValueError(f"{OP}: kernel must be 'splitk' or 'gemm', got {kernel!r}")
    return out


def _quant_matmul_triton_impl(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    return quant_matmul_triton(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout)


_backend.register_impl(OP, "eager", _quant_matmul_eager)
if triton is not None:
    _backend.register_impl(OP, "triton", _quant_matmul_triton_impl)


# ---------------------------------------------------------------------------------------------------------------
# custom op + public function
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("internvl_kernels::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                     g_idx: Optional[torch.Tensor], bias: Optional[torch.Tensor], bits: int, group_size: int,
                     layout: str) -> torch.Tensor:
    impl = _backend.dispatch(OP, x.device)
    return impl(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout)


@_quant_matmul_op.register_fake
def _quant_matmul_fake(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    return x.new_empty((x.shape[0], scales.shape[1]))


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor | None = None, bits: int = 4, group_size: int = 128, layout: str = "gptq",
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequantize(qweight, scales, qzeros, g_idx).T (+ bias)`` for ``x [..., K]`` → ``[..., N]`` in ``x.dtype``.

    ``layout``: ``"gptq"`` (GPTQ v1: qzeros store zero − 1), ``"gptq_v2"`` (true zeros) or ``"awq"`` (AWQ GEMM,
    4-bit, ``g_idx=None``). ``bits`` ∈ {2, 3, 4, 8} for GPTQ. ``group_size=-1``: one group over all of K.
    ``g_idx`` (GPTQ act-order) may be ``None`` when it equals ``arange(K) // group_size`` (faster kernels).
    """
    K, N, _ = check_quant_matmul_args(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] > 0 and K > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = _quant_matmul_op(x2, qweight, scales, qzeros, g_idx, bias, int(bits), int(group_size), layout)
    return y.reshape(*lead, N)
