"""``layer_norm(x, weight, bias, eps)``: LayerNorm over the last dim (InternViT-300M norms, the projector's LN).

Statistics in fp32 (mean, then the centred second moment, both from registers), weight and bias applied in fp32,
one rounding to ``x.dtype`` — what ``F.layer_norm`` computes. ``weight``/``bias`` may be ``None``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import check_float, check_rank, check_same_device, check_vector, rows_2d
from ._common import on_input_device
from ._norm_kernel import norm_rows

OP = "layer_norm"


def _check(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> None:
    check_float(OP, "x", x)
    check_rank(OP, "x", x, range(1, 9))
    check_vector(OP, "weight", weight, x.shape[-1])
    check_vector(OP, "bias", bias, x.shape[-1])
    check_same_device(OP, "x", x, weight=weight, bias=bias)
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


@on_input_device
def layer_norm_triton(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    y = norm_rows(OP, rows_2d(x), weight, bias, eps, is_rms=False, out_dtype=x.dtype)
    return y.view(x.shape)


def layer_norm_eager(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    return F_ref.layer_norm(x, weight, bias, eps).contiguous()


_backend.register_impl(OP, "eager", layer_norm_eager)
_backend.register_impl(OP, "triton", layer_norm_triton)


@torch.library.custom_op("internvl_kernels::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    _check(x, weight, bias, eps)
    return _backend.dispatch(OP, x.device)(x, weight, bias, eps)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    _check(x, weight, bias, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6) -> Tensor:
    """LayerNorm over the last dim of ``x``; ``weight``/``bias`` optional."""
    return _layer_norm_op(x, weight, bias, float(eps))
