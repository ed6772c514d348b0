"""``add_rms_norm``: the InternViT block's residual update fused with the next RMSNorm (its LayerNorm twin is
:mod:`internvl_kernels.ops.add_layer_norm`, which shares this module's checks and launcher).

``new_residual = residual + x * scale`` (``scale`` = the layer scale ``ls1``/``ls2``, optional) followed by the
norm of ``new_residual``; returns ``(new_residual, normed)`` from one pass over the rows: reads ``x``, ``residual``
(and the [C] vectors), writes both outputs — versus five tensor passes in eager PyTorch. Rounding matches the
eager block: ``x * scale`` is rounded to its dtype, then the sum, then the norm as in ``rms_norm``/``layer_norm``.
Output dtypes follow torch's type promotion exactly like the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import check_float, check_rank, check_same_device, check_same_dtype, check_vector, rows_2d
from ._common import on_input_device
from ._norm_kernel import norm_rows

OP_RMS = "add_rms_norm"


def _dtypes(x: Tensor, residual: Tensor, scale: Optional[Tensor]):
    prod = torch.promote_types(x.dtype, scale.dtype) if scale is not None else x.dtype
    return prod, torch.promote_types(residual.dtype, prod)


def _check(op, x, residual, weight, bias, eps, scale):
    """The argument checks of the residual norms (``residual=None``: a plain norm, as the W8A8 norm + quant ops
    of the first block use)."""
    check_float(op, "x", x)
    if residual is not None:
        check_float(op, "residual", residual)
    check_rank(op, "x", x, range(1, 9))
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        check_same_dtype(op, "x", x, residual=residual)
    n = x.shape[-1]
    check_vector(op, "weight", weight, n)
    check_vector(op, "bias", bias, n)
    check_vector(op, "scale", scale, n)
    check_same_device(op, "x", x, residual=residual, weight=weight, bias=bias, scale=scale)
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _run(op, x, residual, weight, bias, eps, scale, is_rms):
    prod, res = _dtypes(x, residual, scale)
    out_dtype = torch.promote_types(weight.dtype, res) if (is_rms and weight is not None) else res
    new_res, y = norm_rows(
        op, rows_2d(x), weight, bias, eps, is_rms=is_rms, out_dtype=out_dtype,
        residual2=rows_2d(residual), scale=scale, res_dtype=res, prod_dtype=prod,
    )
    return new_res.view(x.shape), y.view(x.shape)


# ------------------------------------------------------------------------------------------------ add_rms_norm
@on_input_device
def add_rms_norm_triton(x, residual, weight, eps=1e-6, scale=None):
    return _run(OP_RMS, x, residual, weight, None, eps, scale, True)


def add_rms_norm_eager(x, residual, weight, eps=1e-6, scale=None):
    r, y = F_ref.add_rms_norm(x, residual, weight, eps, scale)
    return r.contiguous(), y.contiguous()


_backend.register_impl(OP_RMS, "eager", add_rms_norm_eager)
_backend.register_impl(OP_RMS, "triton", add_rms_norm_triton)


@torch.library.custom_op("internvl_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float, scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(OP_RMS, x, residual, weight, None, eps, scale)
    return _backend.dispatch(OP_RMS, x.device)(x, residual, weight, eps, scale)


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, scale):
    _check(OP_RMS, x, residual, weight, None, eps, scale)
    _, res = _dtypes(x, residual, scale)
    return x.new_empty(x.shape, dtype=res), x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, res))


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, scale: Optional[Tensor] = None):
    """``new_residual = residual + scale * x``; returns ``(new_residual, rms_norm(new_residual, weight, eps))``."""
    return _add_rms_norm_op(x, residual, weight, float(eps), scale)
