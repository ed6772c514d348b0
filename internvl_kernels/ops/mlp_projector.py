"""``mlp_projector(x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5)``: InternVL's ``mlp1`` projector.

LayerNorm(4C, eps 1e-5) → Linear(4C → H) → exact GELU → Linear(H → H). The Triton path runs the LayerNorm kernel
(one pass over ``x``) and two GEMMs from :mod:`.linear` with bias (+ GELU for the first) in the epilogue, so the
GELU never costs a memory pass; each GEMM goes to cuBLAS instead where the one-time timing says it is faster
(see :func:`internvl_kernels.ops.linear.linear_choices`). The patched model feeds the projector from
:func:`internvl_kernels.ops.pixel_shuffle_layer_norm` (shuffle + LN fused) and then calls :func:`projector_gemms`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import check_float, check_rank, check_same_device, check_same_dtype, check_vector
from ._common import on_input_device
from .layer_norm import layer_norm_triton
from .linear import linear_triton

OP = "mlp_projector"


def _check(x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
    check_float(OP, "x", x)
    check_rank(OP, "x", x, range(2, 9))
    K = x.shape[-1]
    check_vector(OP, "ln_weight", ln_weight, K)
    check_vector(OP, "ln_bias", ln_bias, K)
    for name, w in (("w1", w1), ("w2", w2)):
        check_float(OP, name, w)
        check_rank(OP, name, w, 2)
    if w1.shape[1] != K:
        raise ValueError(f"{OP}: w1 is {tuple(w1.shape)} but x has {K} channels (w1 must be [hidden, {K}])")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"{OP}: w2 is {tuple(w2.shape)} but w1 produces {w1.shape[0]} features")
    check_vector(OP, "b1", b1, w1.shape[0])
    check_vector(OP, "b2", b2, w2.shape[0])
    check_same_dtype(OP, "x", x, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    check_same_device(OP, "x", x, ln_weight=ln_weight, ln_bias=ln_bias, w1=w1, b1=b1, w2=w2, b2=b2)
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


def projector_gemms(h: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """The projector after its LayerNorm, as two ``linear`` custom ops (GELU fused into the first)."""
    from .linear import linear

    return linear(linear(h, w1, b1, "gelu"), w2, b2, "none")


@on_input_device
def mlp_projector_triton(x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5):
    h = layer_norm_triton(x, ln_weight, ln_bias, eps)
    h = linear_triton(h, w1, b1, "gelu")
    return linear_triton(h, w2, b2, "none")


def mlp_projector_eager(x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5):
    return F_ref.mlp_projector(x, ln_weight, ln_bias, w1, b1, w2, b2, eps).contiguous()


_backend.register_impl(OP, "eager", mlp_projector_eager)
_backend.register_impl(OP, "triton", mlp_projector_triton)


@torch.library.custom_op("internvl_kernels::mlp_projector", mutates_args=())
def _mlp_projector_op(
    x: Tensor, ln_weight: Tensor, ln_bias: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, eps: float
) -> Tensor:
    _check(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)
    return _backend.dispatch(OP, x.device)(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)


@_mlp_projector_op.register_fake
def _(x, ln_weight, ln_bias, w1, b1, w2, b2, eps):
    _check(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)
    return x.new_empty((*x.shape[:-1], w2.shape[0]))


def mlp_projector(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    eps: float = 1e-5,
) -> Tensor:
    """``mlp1(x)``: LayerNorm → Linear → GELU(erf) → Linear with biases; x ``[..., 4C]`` → ``[..., H]``."""
    return _mlp_projector_op(x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))
