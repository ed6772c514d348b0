"""``add_layer_norm``: the InternViT-300M block's residual update fused with the next LayerNorm.

The LayerNorm twin of :mod:`internvl_kernels.ops.add_rms_norm` (same row kernel, checks and rounding rules:
``new_residual = residual + x * scale`` rounded as the eager block, then the LayerNorm of it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from .add_rms_norm import _check, _dtypes, _run
from ._common import on_input_device

OP_LN = "add_layer_norm"


@on_input_device
def add_layer_norm_triton(x, residual, weight, bias, eps=1e-6, scale=None):
    return _run(OP_LN, x, residual, weight, bias, eps, scale, False)


def add_layer_norm_eager(x, residual, weight, bias, eps=1e-6, scale=None):
    r, y = F_ref.add_layer_norm(x, residual, weight, bias, eps, scale)
    return r.contiguous(), y.contiguous()


_backend.register_impl(OP_LN, "eager", add_layer_norm_eager)
_backend.register_impl(OP_LN, "triton", add_layer_norm_triton)


@torch.library.custom_op("internvl_kernels::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, scale: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    _check(OP_LN, x, residual, weight, bias, eps, scale)
    return _backend.dispatch(OP_LN, x.device)(x, residual, weight, bias, eps, scale)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, scale):
    _check(OP_LN, x, residual, weight, bias, eps, scale)
    _, res = _dtypes(x, residual, scale)
    return x.new_empty(x.shape, dtype=res), x.new_empty(x.shape, dtype=res)


def add_layer_norm(
    x: Tensor,
    residual: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-6,
    scale: Optional[Tensor] = None,
):
    """LayerNorm twin of :func:`add_rms_norm`; returns ``(new_residual, layer_norm(new_residual))``."""
    return _add_layer_norm_op(x, residual, weight, bias, float(eps), scale)
