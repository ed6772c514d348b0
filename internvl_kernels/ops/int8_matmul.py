"""``int8_matmul``: the W8A8 GEMM — int8 × int8 → int32 (or fp8 e4m3 × fp8 → fp32) with the dequant epilogue.

``y = act((a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias)`` → bf16 / fp16 / fp32, where ``a`` ``[..., K]``
are the per-token activation codes (from :func:`~internvl_kernels.ops.add_rms_norm_quant` & co.), ``a_scale``
``[...]`` their fp32 scales, ``w`` ``[N, K]`` the per-output-channel weight codes (``nn.Linear`` layout, int8 or
float8_e4m3fn — the same op serves both), ``w_scale`` ``[N]`` fp32, ``bias`` ``[N]`` (any float dtype) and
``activation`` "none" | "gelu" (exact erf, for ``fc1``). Definition: :func:`internvl_kernels.model.functional.
int8_matmul`. :func:`int8_matmul_accumulate` returns the raw int32 accumulator of the same Triton kernel (the tests
hold it to the integer reference bit for bit).

Implementations, tried in priority order; each has ``can_implement(...) -> (ok, reason)``:

1. ``triton``   — one kernel, the epilogue applied to the int32 / fp32 accumulator tile in registers before the
   single rounding (no int32 ``[M, N]`` intermediate in memory). Grouped tile order; tensor-core ``tl.dot``.
2. ``cublaslt`` — ``torch._int_mm`` (int8 → int32, then the epilogue as torch ops: one extra int32 pass) or
   ``torch._scaled_mm`` with row-wise scales and the bias fused (fp8, sm_89+, bf16 output; GELU applied after).
3. ``eager``    — the reference.

On a CUDA device with ``INTERNVL_KERNELS_W8A8_GEMM=auto`` (default) every implementation that can run a shape is
timed once per (M bucket, N, K, codes, activation, output dtype) and the fastest is kept; ``triton`` /
``cublaslt`` / ``eager`` force one (falling back down the list, with the reason, when it cannot run the shape).
:func:`int8_matmul_choices` shows every decision with its reason. Under the Triton interpreter (CPU tests) the
Triton kernel runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import INTERPRET, autotune_configs, count_launch, env_flag, new_empty
from ._common import on_input_device

OP = "int8_matmul"
OP_ACC = "int8_matmul_accumulate"
ACTIVATIONS = ("none", "gelu")
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
IMPLS = ("triton", "cublaslt", "eager")
_ENV = "INTERNVL_KERNELS_W8A8_GEMM"

__all__ = ["int8_matmul", "int8_matmul_accumulate", "int8_matmul_choices", "can_implement"]

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - platform without triton
    triton = None


# ---------------------------------------------------------------------------------------------------- validation
def _check(a, a_scale, w, w_scale, bias, activation, out_dtype):
    for name, t in (("a", a), ("a_scale", a_scale), ("w", w), ("w_scale", w_scale)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if a.dtype not in CODE_DTYPES or w.dtype not in CODE_DTYPES:
        raise TypeError(f"{OP}: a and w must be int8 or float8_e4m3fn codes, got a {a.dtype}, w {w.dtype}")
    if a.dtype != w.dtype:
        raise TypeError(f"{OP}: a ({a.dtype}) and w ({w.dtype}) must have the same code dtype")
    if a.dim() < 1:
        raise ValueError(f"{OP}: a must have shape [..., K]")
    if w.dim() != 2:
        raise ValueError(f"{OP}: w must be 2-D [N, K] (nn.Linear layout), got shape {tuple(w.shape)}")
    N, K = w.shape
    if a.shape[-1] != K:
        raise ValueError(f"{OP}: a has {a.shape[-1]} input features but w is [N={N}, K={K}]")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise TypeError(f"{OP}: a_scale and w_scale must be float32, got {a_scale.dtype}, {w_scale.dtype}")
    if tuple(a_scale.shape) != tuple(a.shape[:-1]):
        raise ValueError(f"{OP}: a_scale must have shape {tuple(a.shape[:-1])} (one scale per token), got "
                         f"{tuple(a_scale.shape)}")
    if tuple(w_scale.shape) != (N,):
        raise ValueError(f"{OP}: w_scale must have shape ({N},) (one scale per output channel), got "
                         f"{tuple(w_scale.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point() or bias.dtype in CODE_DTYPES:
            raise TypeError(f"{OP}: bias must be a float16/bfloat16/float32 tensor [N]")
        if tuple(bias.shape) != (N,):
            raise ValueError(f"{OP}: bias must have shape ({N},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"{OP}: out_dtype must be one of bfloat16, float16, float32, got {out_dtype}")
    for name, t in (("a_scale", a_scale), ("w", w), ("w_scale", w_scale), ("bias", bias)):
        if t is not None and t.device != a.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but a is on {a.device}; move them to one device")
    if not w.is_contiguous():
        raise ValueError(f"{OP}: w must be contiguous (call .contiguous() once at load time)")


# ---------------------------------------------------------------------------------------------------- triton
if triton is not None:
    from ._tl import grouped_tile, to_dtype
    from .linear import _gelu_erf

    @triton.jit
    def _int8_matmul_kernel(
        A, W, AS, WS, BIAS, Y, M, N, K,
        stride_am, stride_wn, stride_ym,
        EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, FP8: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # rows/cols past the edge wrap around (always in bounds); their results are masked at the store
        am = (offs_m % M).to(tl.int64)
        bn = (offs_n % N).to(tl.int64)
        a_ptrs = A + am[:, None] * stride_am + offs_k[None, :]
        w_ptrs = W + bn[None, :] * stride_wn + offs_k[:, None]
        if FP8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(w_ptrs)
            else:
                kmask = offs_k < K - k0
                if FP8:
                    a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
                    b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
                else:
                    a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
                    b = tl.load(w_ptrs, mask=kmask[:, None], other=0)
            if FP8:
                if UPCAST:  # the interpreter has no fp8 dot: fp8 values and their products are exact in fp32
                    acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K

        y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if EPILOGUE:
            y = acc.to(tl.float32) * tl.load(AS + am)[:, None]
            y = y * tl.load(WS + bn)[None, :]
            if HAS_BIAS:
                y = y + tl.load(BIAS + bn).to(tl.float32)[None, :]
            if GELU:
                y = _gelu_erf(y)
            tl.store(y_ptrs, to_dtype(y, Y.dtype.element_ty), mask=mask)
        else:
            tl.store(y_ptrs, acc, mask=mask)

    def keeps_config(c, gelu: bool) -> bool:
        """Configs the autotuner may pick: with the erf-GELU epilogue, tiles of more than 64 accumulator elements per
        thread (128x256 / 256x128 with 8 warps, 128x128 with 4) spill registers on sm_90 (ptxas -v: 52-88 B), so
        GELU launches keep at most 64 per thread."""
        per_thread = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
        return not (gelu and per_thread > 64)

    def gpu_configs():
        cfgs = []
        for bm, bn, bk, ns, nw in ((128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 4, 8),
                                   (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4),
                                   (64, 64, 128, 4, 4)):
            cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                      num_stages=ns, num_warps=nw))
        return cfgs

    def _prune(configs, named_args, **kwargs):
        M = named_args["M"]
        gelu = bool(kwargs.get("GELU", named_args.get("GELU", False)))
        out = [c for c in configs if not (M <= 64 and c.kwargs["BLOCK_M"] > 64) and keeps_config(c, gelu)]
        return out or configs[-1:]

    INTERPRET_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4},
                                     num_stages=1, num_warps=4)
    _tuned = triton.autotune(
        configs=autotune_configs(gpu_configs(), INTERPRET_CONFIG),
        key=["M", "N", "K", "EPILOGUE", "HAS_BIAS", "GELU", "FP8"],
        prune_configs_by=None if INTERPRET else {"early_config_prune": _prune},
    )(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_int8_matmul_kernel))


@on_input_device
def _launch(a2, a_scale, w, w_scale, bias, gelu, out_dtype, epilogue=True):
    M, K = a2.shape
    N = w.shape[0]
    y = new_empty((M, N), out_dtype if epilogue else torch.int32, a2.device) if epilogue else \
        torch.full((M, N), -(2 ** 31), dtype=torch.int32, device=a2.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if epilogue:
            return F_ref.int8_matmul(a2, a_scale, w, w_scale, bias, "gelu" if gelu else "none", out_dtype)
        return y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    fp8 = a2.dtype == torch.float8_e4m3fn
    _tuned[grid](
        a2, w, a_scale if a_scale is not None else w, w_scale if w_scale is not None else w,
        bias if bias is not None else w, y, M, N, K, a2.stride(0), w.stride(0), y.stride(0),
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, GELU=gelu, FP8=fp8, UPCAST=fp8 and INTERPRET,
    )
    count_launch(OP)
    return y


def _rows(a):
    a2 = a.reshape(-1, a.shape[-1])
    return a2 if a2.stride(-1) == 1 or a2.shape[-1] <= 1 else a2.contiguous()


def _triton_impl(a2, a_scale, w, w_scale, bias, gelu, out_dtype):
    return _launch(a2, a_scale.reshape(-1).contiguous(), w, w_scale.contiguous(),
                   None if bias is None else bias.contiguous(), gelu, out_dtype)


def _cublaslt_impl(a2, a_scale, w, w_scale, bias, gelu, out_dtype):
    M = a2.shape[0]
    if a2.dtype == torch.int8:
        acc = torch._int_mm(a2, w.t())
        y = acc.to(torch.float32) * a_scale.reshape(M, 1)
        y = y * w_scale[None, :]
        if bias is not None:
            y = y + bias.to(torch.float32)
        return (F_ref.gelu(y) if gelu else y).to(out_dtype)
    y = torch._scaled_mm(a2, w.t(), scale_a=a_scale.reshape(M, 1), scale_b=w_scale.reshape(1, -1),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    return F_ref.gelu(y) if gelu else y


def _eager_impl(a2, a_scale, w, w_scale, bias, gelu, out_dtype):
    return F_ref.int8_matmul(a2, a_scale.reshape(-1), w, w_scale, bias, "gelu" if gelu else "none", out_dtype)


def can_implement(impl: str, a2: Tensor, w: Tensor, out_dtype: torch.dtype, activation: str = "none"):
    """``(ok, reason)``: can implementation ``impl`` run this problem (``a2`` ``[M, K]`` codes, ``w`` ``[N, K]``)?"""
    M, K = a2.shape
    N = w.shape[0]
    fp8 = a2.dtype == torch.float8_e4m3fn
    cuda = a2.device.type == "cuda"
    if impl == "eager":
        return True, "the reference runs everywhere"
    if impl == "triton":
        if triton is None:
            return False, "triton is not installed"
        if not cuda and not INTERPRET:
            return False, "CPU tensors need TRITON_INTERPRET=1 for the Triton kernel"
        if cuda and fp8 and torch.cuda.get_device_capability(a2.device) < (8, 9):
            return False, "fp8 tensor cores need sm_89+"
        return True, "fused dequant epilogue in registers"
    if impl == "cublaslt":
        if not cuda:
            return False, "cuBLASLt needs a CUDA device"
        if not fp8:
            if M <= 16:
                return False, f"torch._int_mm needs M > 16 (M={M})"
            if K % 8 or N % 8:
                return False, f"torch._int_mm needs K and N multiples of 8 (K={K}, N={N})"
            return True, "torch._int_mm + epilogue pass"
        if torch.cuda.get_device_capability(a2.device) < (9, 0):
            return False, "row-wise scaled fp8 _scaled_mm needs sm_90"
        if out_dtype != torch.bfloat16:
            return False, "row-wise scaled _scaled_mm writes bfloat16 only"
        if K % 16 or N % 16:
            return False, f"_scaled_mm needs K and N multiples of 16 (K={K}, N={N})"
        return True, "torch._scaled_mm (row-wise scales, bias fused)" + (" + GELU pass" if activation == "gelu" else "")
    raise ValueError(f"{OP}: unknown implementation {impl!r}; choose one of {IMPLS}")


_FNS = {"triton": _triton_impl, "cublaslt": _cublaslt_impl, "eager": _eager_impl}
_CHOICES: dict = {}


def int8_matmul_choices() -> dict:
    """``{(M bucket, N, K, codes, activation, out_dtype): (implementation, reason)}`` decided in this process."""
    return dict(_CHOICES)


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def select(a2, w, out_dtype, activation, args=None) -> tuple[str, str]:
    """The implementation for this problem and why (priority order, forced by ``INTERNVL_KERNELS_W8A8_GEMM``, or
    timed once per shape bucket on a GPU)."""
    mode = env_flag(_ENV, "auto")
    if mode not in ("auto",) + IMPLS:
        raise ValueError(f"{_ENV}={mode!r}: choose auto, triton, cublaslt or eager")
    key = (_m_bucket(a2.shape[0]), w.shape[0], a2.shape[1], str(a2.dtype).replace("torch.", ""), activation,
           str(out_dtype).replace("torch.", ""))
    if key in _CHOICES and mode == "auto":
        return _CHOICES[key]
    ok = {}
    for impl in IMPLS:
        ok[impl] = can_implement(impl, a2, w, out_dtype, activation)
    if mode != "auto":
        if ok[mode][0]:
            return mode, f"forced by {_ENV}"
        why = ok[mode][1]
        fallback = next(i for i in IMPLS if ok[i][0])
        return fallback, f"{_ENV}={mode} cannot run this shape ({why}); using {fallback}"
    runnable = [i for i in IMPLS if ok[i][0]]
    if a2.device.type != "cuda" or len(runnable) == 1 or args is None:
        choice = (runnable[0], ok[runnable[0]][1] + " (first that can implement it)")
    elif torch.cuda.is_current_stream_capturing():
        choice = (runnable[0], "inside a CUDA-graph capture: first that can implement it (no timing)")
    else:
        from triton.testing import do_bench

        cands = [i for i in runnable if i != "eager"]
        times = {i: do_bench(lambda i=i: _FNS[i](*args), warmup=10, rep=40) for i in cands}
        best = min(cands, key=lambda i: times[i])
        choice = (best, "timed: " + ", ".join(f"{i} {times[i] * 1e3:.1f} us" for i in cands))
    _CHOICES[key] = choice
    return choice


def int8_matmul_triton(a, a_scale, w, w_scale, bias, activation, out_dtype):
    a2 = _rows(a)
    args = (a2, a_scale.reshape(-1), w, w_scale, bias, activation == "gelu", out_dtype)
    impl, _ = select(a2, w, out_dtype, activation, args)
    y = _FNS[impl](*args)
    return y.view(*a.shape[:-1], w.shape[0])


def int8_matmul_eager(a, a_scale, w, w_scale, bias, activation, out_dtype):
    y = F_ref.int8_matmul(a.reshape(-1, a.shape[-1]), a_scale.reshape(-1), w, w_scale, bias, activation, out_dtype)
    return y.view(*a.shape[:-1], w.shape[0])


_backend.register_impl(OP, "eager", int8_matmul_eager)
_backend.register_impl(OP, "triton", int8_matmul_triton)


@torch.library.custom_op("internvl_kernels::int8_matmul", mutates_args=())
def _int8_matmul_op(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor], activation: str,
                    out_dtype: torch.dtype) -> Tensor:
    _check(a, a_scale, w, w_scale, bias, activation, out_dtype)
    return _backend.dispatch(OP, a.device)(a, a_scale, w, w_scale, bias, activation, out_dtype)


@_int8_matmul_op.register_fake
def _(a, a_scale, w, w_scale, bias, activation, out_dtype):
    _check(a, a_scale, w, w_scale, bias, activation, out_dtype)
    return a.new_empty((*a.shape[:-1], w.shape[0]), dtype=out_dtype)


def int8_matmul(a: Tensor, a_scale: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                activation: str = "none", out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """``act((a @ w.T) * a_scale[..., None] * w_scale + bias)`` in ``out_dtype`` (see the module docstring)."""
    return _int8_matmul_op(a, a_scale, w, w_scale, bias, str(activation), out_dtype)


# ------------------------------------------------------------------------------------------- int32 accumulator
def _acc_triton(a, w):
    return _launch(_rows(a), None, w, None, None, False, torch.int32, epilogue=False)


_backend.register_impl(OP_ACC, "eager", lambda a, w: F_ref.int8_matmul_accumulate(a, w))
_backend.register_impl(OP_ACC, "triton", _acc_triton)


def _check_acc(a, w):
    if not isinstance(a, Tensor) or not isinstance(w, Tensor) or a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"{OP_ACC}: a and w must be int8 tensors")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"{OP_ACC}: a must be [M, K] and w [N, K], got {tuple(a.shape)} and {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError(f"{OP_ACC}: w must be contiguous")
    if a.device != w.device:
        raise ValueError(f"{OP_ACC}: w is on {w.device} but a is on {a.device}")


@torch.library.custom_op("internvl_kernels::int8_matmul_accumulate", mutates_args=())
def _acc_op(a: Tensor, w: Tensor) -> Tensor:
    _check_acc(a, w)
    return _backend.dispatch(OP_ACC, a.device)(a, w)


@_acc_op.register_fake
def _(a, w):
    _check_acc(a, w)
    return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int32)


def int8_matmul_accumulate(a: Tensor, w: Tensor) -> Tensor:
    """The raw int32 accumulator ``a @ w.T`` of the int8 GEMM kernel (no epilogue) — exact integer arithmetic."""
    return _acc_op(a, w)
