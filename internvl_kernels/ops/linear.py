"""``linear(x, weight, bias=None, activation="none"|"gelu")``: GEMM with the bias and exact-erf GELU in the epilogue.

Used by the projector (``mlp1``: Linear → GELU → Linear) and by the patched InternViT MLP (``fc1`` → GELU). The Triton
kernel computes ``x @ weight.T`` with ``weight`` in ``nn.Linear``'s ``[out, in]`` layout (no transposed copy), fp32
accumulation, grouped tile order for L2 reuse, and applies ``+ bias`` and ``0.5·x·(1 + erf(x/√2))`` to the fp32
accumulator before the single rounding to the output dtype — the eager path rounds after the GEMM and again after
the GELU, and makes an extra read + write of the activation.

cuBLAS vs Triton: on CUDA the ``triton`` backend times both paths once per (M bucket, N, K, dtype, activation) —
cuBLAS ``addmm`` (+ a separate GELU) against the fused Triton kernel — and keeps the faster one
(:func:`linear_choices` shows the decisions; ``internvl_kernels.options.set_linear_impl("triton"|"cublas")`` forces one; ``INTERNVL_KERNELS_LINEAR`` sets the default). Under the
interpreter the Triton kernel always runs. fp32 inputs use IEEE fp32 dots (no TF32), as PyTorch's default.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .. import _backend, options
from ..model import functional as F_ref
from ._common import (
    launch_tuned, on_input_device, register_tuner,
    INTERPRET, autotune_configs, check_float, check_rank, check_same_device, check_same_dtype, count_launch,
    env_flag, new_empty, upcast_dots, next_pow2,
)
from ._tl import grouped_tile, to_dtype

OP = "linear"
ACTIVATIONS = ("none", "gelu")


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit(do_not_specialize=["M_BUCKET"])
def _linear_kernel(
    X, W, BIAS, Y, M, N, K,
    stride_xm, stride_wn, stride_ym, M_BUCKET,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # rows/cols past the edge wrap around (always in bounds); their results are masked at the store
    am = (offs_m % M).to(tl.int64)
    bn = (offs_n % N).to(tl.int64)
    x_ptrs = X + am[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + bn[None, :] * stride_wn + offs_k[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            kmask = offs_k < K - k0
            a = tl.load(x_ptrs, mask=kmask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=kmask[:, None], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        elif IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc = acc + tl.load(BIAS + bn).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu_erf(acc)
    y_ptrs = Y + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, to_dtype(acc, Y.dtype.element_ty), mask=mask)


def _gpu_configs():
    cfgs = []
    # not candidates, they spill registers on sm_90 (tests/test_triton_spills.py): 128x256 / 256x128 x 64 with 8 warps
    # (224-236 B), 128x128x64 with 4 warps (112 B), 64x256x64 with 4 warps (300 B)
    for bm, bn, bk, ns, nw in (
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
        # fp32 (IEEE) friendly: smaller K steps
        (128, 128, 32, 3, 8),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
    ):
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                  num_stages=ns, num_warps=nw))
    return cfgs


def _prune(configs, named_args, **kwargs):
    x = named_args["X"]
    M = named_args["M"]
    out = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if x.dtype == torch.float32 and bk > 32:
            continue  # fp32 tiles of 64-deep K overflow shared memory with these stage counts
        if x.dtype != torch.float32 and bk < 64:
            continue
        if M <= 64 and bm > 64:
            continue  # small M: don't waste a 128/256-row tile
        out.append(c)
    return out or configs[-1:]


_linear_tuned = triton.autotune(
    configs=autotune_configs(
        _gpu_configs(),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_stages=1, num_warps=4),
    ),
    # M enters the key as its power-of-two bucket (M_BUCKET, not read by the kernel): one tuning per bucket,
    # not one per tile count / sequence length
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "GELU"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune},
)(triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(_linear_kernel))
register_tuner("linear", _linear_tuned)


def _linear_triton_kernel(x2: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    M, K = x2.shape
    N = weight.shape[0]
    y = new_empty((M, N), x2.dtype, x2.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        y.zero_()
        if bias is not None:
            y += bias
        return F_ref.gelu(y) if gelu else y

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    launch_tuned(
        OP, _linear_tuned, grid,
        x2, weight, bias if bias is not None else weight, y, M, N, K,
        x2.stride(0), weight.stride(0), y.stride(0), next_pow2(M),
        HAS_BIAS=bias is not None, GELU=gelu, UPCAST=upcast_dots(x2.dtype), IEEE=x2.dtype == torch.float32,
        prune=None if INTERPRET else _prune,
    )
    count_launch(OP)
    return y


def _linear_cublas(x2: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> Tensor:
    y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
    return F_ref.gelu(y) if gelu else y


# ---------------------------------------------------------------------------------------------- cuBLAS vs Triton
_CHOICES: dict = {}


def linear_choices() -> dict:
    """``{(M bucket, N, K, dtype, activation): "triton" | "cublas"}`` decided so far on this process's GPU."""
    return dict(_CHOICES)


def _pick(x2: Tensor, weight: Tensor, bias: Optional[Tensor], gelu: bool) -> str:
    if INTERPRET or x2.device.type != "cuda":
        return "triton"
    mode = options.get_linear_impl()
    if mode in ("triton", "cublas"):
        return mode
    M, K = x2.shape
    key = (next_pow2(M), weight.shape[0], K, str(x2.dtype).replace("torch.", ""), "gelu" if gelu else "none")
    choice = _CHOICES.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "cublas"  # can't time inside a CUDA-graph capture; cuBLAS is the safe default
        from triton.testing import do_bench

        t_triton = do_bench(lambda: _linear_triton_kernel(x2, weight, bias, gelu), warmup=10, rep=40)
        t_cublas = do_bench(lambda: _linear_cublas(x2, weight, bias, gelu), warmup=10, rep=40)
        choice = "triton" if t_triton <= t_cublas else "cublas"
        _CHOICES[key] = choice
    return choice


def linear_rows(x2: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    gelu = activation == "gelu"
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if _pick(x2, weight, bias, gelu) == "cublas":
        return _linear_cublas(x2, weight, bias, gelu)
    return _linear_triton_kernel(x2, weight, bias, gelu)


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> None:
    check_float(OP, "x", x)
    check_float(OP, "weight", weight)
    check_rank(OP, "x", x, range(1, 9))
    check_rank(OP, "weight", weight, 2)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"{OP}: weight is [out={weight.shape[0]}, in={weight.shape[1]}] but x has "
                         f"{x.shape[-1]} input features")
    if bias is not None:
        check_float(OP, "bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{OP}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    check_same_dtype(OP, "x", x, weight=weight, bias=bias)
    check_same_device(OP, "x", x, weight=weight, bias=bias)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{OP}: activation must be one of {ACTIVATIONS}, got {activation!r}")


@on_input_device
def linear_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    y = linear_rows(x.reshape(-1, x.shape[-1]), weight, bias, activation)
    return y.view(*x.shape[:-1], weight.shape[0])


def linear_eager(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    return F_ref.linear(x, weight, bias, activation).contiguous()


_backend.register_impl(OP, "eager", linear_eager)
_backend.register_impl(OP, "triton", linear_triton)


@torch.library.custom_op("internvl_kernels::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
    _check(x, weight, bias, activation)
    return _backend.dispatch(OP, x.device)(x, weight, bias, activation)


@_linear_op.register_fake
def _(x, weight, bias, activation):
    _check(x, weight, bias, activation)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, activation: str = "none") -> Tensor:
    """``activation(x @ weight.T + bias)`` with ``activation`` ∈ {"none", "gelu" (exact erf)}."""
    return _linear_op(x, weight, bias, str(activation))
