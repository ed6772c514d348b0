"""W8A8 activation ops: the norm that also emits int8 / fp8 codes and per-token scales in the same pass.

* ``add_rms_norm_quant(x, residual, weight, eps, scale, quant_dtype, input_scale)`` → ``(new_residual, codes,
  token_scales)``: InternViT's ``residual + x * ls`` update, RMSNorm, then :func:`quantize_per_token` of the normed
  row — one read of ``x`` and ``residual``, writes the residual, int8 (or fp8 e4m3) codes and fp32 scales. The
  normalized bf16 activation never goes to memory.
* ``add_layer_norm_quant`` — the LayerNorm twin (InternViT-300M).
* ``rms_norm_quant`` / ``layer_norm_quant`` — no residual update: the first block's ``norm1``.

``quant_dtype``: ``"int8"`` (codes -127..127) or ``"fp8"`` (float8_e4m3fn). ``input_scale``: optional 1-element fp32
tensor, a static per-tensor activation scale (calibrated); ``None`` = dynamic per-token scales. The definitions (and
the rounding: half-to-even) are the eager references of the same names in :mod:`internvl_kernels.model.functional`;
the kernel is :mod:`internvl_kernels.ops._norm_quant_kernel`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from .add_rms_norm import _check as check_norm_args
from ._common import check_same_device, rows_2d
from ._common import on_input_device
from ._norm_quant_kernel import norm_quant_rows

QUANT_DTYPE_NAMES = tuple(F_ref.QUANT_DTYPES)

__all__ = ["add_rms_norm_quant", "add_layer_norm_quant", "rms_norm_quant", "layer_norm_quant",
           "check_quant_args"]


def check_quant_args(op: str, x: Tensor, quant_dtype: str, input_scale: Optional[Tensor]) -> None:
    if quant_dtype not in QUANT_DTYPE_NAMES:
        raise ValueError(f"{op}: quant_dtype must be one of {QUANT_DTYPE_NAMES}, got {quant_dtype!r}")
    if input_scale is not None:
        if not isinstance(input_scale, Tensor) or input_scale.dtype != torch.float32 or input_scale.numel() != 1:
            raise ValueError(f"{op}: input_scale must be a 1-element float32 tensor (a static per-tensor scale) or "
                             f"None (dynamic per-token), got "
                             f"{getattr(input_scale, 'dtype', type(input_scale).__name__)} "
                             f"{tuple(getattr(input_scale, 'shape', ()))}")
        check_same_device(op, "x", x, input_scale=input_scale)


def _check(op, x, residual, weight, bias, eps, scale, quant_dtype, input_scale):
    check_norm_args(op, x, residual, weight, bias, eps, scale)  # the (residual) norms' own checks
    check_quant_args(op, x, quant_dtype, input_scale)


def _dtypes(x, residual, weight, scale, is_rms):
    """(prod, residual, normed-output) dtypes, by torch's promotion exactly as the references compute them."""
    if residual is None:
        res = x.dtype
        prod = x.dtype
    else:
        prod = torch.promote_types(x.dtype, scale.dtype) if scale is not None else x.dtype
        res = torch.promote_types(residual.dtype, prod)
    y = torch.promote_types(weight.dtype, res) if (is_rms and weight is not None) else res
    return prod, res, y


@on_input_device
def _run(op, x, residual, weight, bias, eps, scale, quant_dtype, input_scale, is_rms):
    prod, res, y = _dtypes(x, residual, weight, scale, is_rms)
    new_res, q, s = norm_quant_rows(
        op, rows_2d(x), norm="rms" if is_rms else "layer", quant_dtype=quant_dtype, y_dtype=y, weight=weight,
        bias=bias, eps=eps, residual2=rows_2d(residual) if residual is not None else None, scale=scale,
        res_dtype=res if residual is not None else None, prod_dtype=prod, input_scale=input_scale)
    out = (q.view(x.shape), s.view(x.shape[:-1]))
    return ((new_res.view(x.shape),) + out) if residual is not None else out


def _fake(x, residual, weight, scale, quant_dtype, is_rms):
    _, res, _ = _dtypes(x, residual, weight, scale, is_rms)
    q = x.new_empty(x.shape, dtype=F_ref.QUANT_DTYPES[quant_dtype])
    s = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return ((x.new_empty(x.shape, dtype=res),) if residual is not None else ()) + (q, s)


def _contig(*ts):
    return tuple(t.contiguous() for t in ts)


# -------------------------------------------------------------------------------------------- add_rms_norm_quant
OP_ARMS = "add_rms_norm_quant"
_backend.register_impl(OP_ARMS, "eager", lambda x, r, w, eps, sc, qd, isc: _contig(
    *F_ref.add_rms_norm_quant(x, r, w, eps, sc, qd, isc)))
_backend.register_impl(OP_ARMS, "triton", lambda x, r, w, eps, sc, qd, isc: _run(
    OP_ARMS, x, r, w, None, eps, sc, qd, isc, True))


@torch.library.custom_op("internvl_kernels::add_rms_norm_quant", mutates_args=())
def _add_rms_norm_quant_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float, scale: Optional[Tensor],
                           quant_dtype: str, input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check(OP_ARMS, x, residual, weight, None, eps, scale, quant_dtype, input_scale)
    return _backend.dispatch(OP_ARMS, x.device)(x, residual, weight, eps, scale, quant_dtype, input_scale)


@_add_rms_norm_quant_op.register_fake
def _(x, residual, weight, eps, scale, quant_dtype, input_scale):
    _check(OP_ARMS, x, residual, weight, None, eps, scale, quant_dtype, input_scale)
    return _fake(x, residual, weight, scale, quant_dtype, True)


def add_rms_norm_quant(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6, scale: Optional[Tensor] = None,
                       quant_dtype: str = "int8", input_scale: Optional[Tensor] = None):
    """``r = residual + scale * x``; returns ``(r, *quantize_per_token(rms_norm(r, weight, eps)))``."""
    return _add_rms_norm_quant_op(x, residual, weight, float(eps), scale, str(quant_dtype), input_scale)


# ------------------------------------------------------------------------------------------ add_layer_norm_quant
OP_ALN = "add_layer_norm_quant"
_backend.register_impl(OP_ALN, "eager", lambda x, r, w, b, eps, sc, qd, isc: _contig(
    *F_ref.add_layer_norm_quant(x, r, w, b, eps, sc, qd, isc)))
_backend.register_impl(OP_ALN, "triton", lambda x, r, w, b, eps, sc, qd, isc: _run(
    OP_ALN, x, r, w, b, eps, sc, qd, isc, False))


@torch.library.custom_op("internvl_kernels::add_layer_norm_quant", mutates_args=())
def _add_layer_norm_quant_op(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                             scale: Optional[Tensor], quant_dtype: str,
                             input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check(OP_ALN, x, residual, weight, bias, eps, scale, quant_dtype, input_scale)
    return _backend.dispatch(OP_ALN, x.device)(x, residual, weight, bias, eps, scale, quant_dtype, input_scale)


@_add_layer_norm_quant_op.register_fake
def _(x, residual, weight, bias, eps, scale, quant_dtype, input_scale):
    _check(OP_ALN, x, residual, weight, bias, eps, scale, quant_dtype, input_scale)
    return _fake(x, residual, weight, scale, quant_dtype, False)


def add_layer_norm_quant(x: Tensor, residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         eps: float = 1e-6, scale: Optional[Tensor] = None, quant_dtype: str = "int8",
                         input_scale: Optional[Tensor] = None):
    """LayerNorm twin of :func:`add_rms_norm_quant`."""
    return _add_layer_norm_quant_op(x, residual, weight, bias, float(eps), scale, str(quant_dtype), input_scale)


# ------------------------------------------------------------------------------------------------ rms_norm_quant
OP_RMS = "rms_norm_quant"
_backend.register_impl(OP_RMS, "eager", lambda x, w, eps, qd, isc: _contig(*F_ref.rms_norm_quant(x, w, eps, qd, isc)))
_backend.register_impl(OP_RMS, "triton", lambda x, w, eps, qd, isc: _run(
    OP_RMS, x, None, w, None, eps, None, qd, isc, True))


@torch.library.custom_op("internvl_kernels::rms_norm_quant", mutates_args=())
def _rms_norm_quant_op(x: Tensor, weight: Tensor, eps: float, quant_dtype: str,
                       input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(OP_RMS, x, None, weight, None, eps, None, quant_dtype, input_scale)
    return _backend.dispatch(OP_RMS, x.device)(x, weight, eps, quant_dtype, input_scale)


@_rms_norm_quant_op.register_fake
def _(x, weight, eps, quant_dtype, input_scale):
    _check(OP_RMS, x, None, weight, None, eps, None, quant_dtype, input_scale)
    return _fake(x, None, weight, None, quant_dtype, True)


def rms_norm_quant(x: Tensor, weight: Tensor, eps: float = 1e-6, quant_dtype: str = "int8",
                   input_scale: Optional[Tensor] = None):
    """``quantize_per_token(rms_norm(x, weight, eps))`` in one pass → ``(codes, token_scales)``."""
    return _rms_norm_quant_op(x, weight, float(eps), str(quant_dtype), input_scale)


# ---------------------------------------------------------------------------------------------- layer_norm_quant
OP_LN = "layer_norm_quant"
_backend.register_impl(OP_LN, "eager", lambda x, w, b, eps, qd, isc: _contig(
    *F_ref.layer_norm_quant(x, w, b, eps, qd, isc)))
_backend.register_impl(OP_LN, "triton", lambda x, w, b, eps, qd, isc: _run(
    OP_LN, x, None, w, b, eps, None, qd, isc, False))


@torch.library.custom_op("internvl_kernels::layer_norm_quant", mutates_args=())
def _layer_norm_quant_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, quant_dtype: str,
                         input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(OP_LN, x, None, weight, bias, eps, None, quant_dtype, input_scale)
    return _backend.dispatch(OP_LN, x.device)(x, weight, bias, eps, quant_dtype, input_scale)


@_layer_norm_quant_op.register_fake
def _(x, weight, bias, eps, quant_dtype, input_scale):
    _check(OP_LN, x, None, weight, bias, eps, None, quant_dtype, input_scale)
    return _fake(x, None, weight, None, quant_dtype, False)


def layer_norm_quant(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-6,
                     quant_dtype: str = "int8", input_scale: Optional[Tensor] = None):
    """``quantize_per_token(layer_norm(x, weight, bias, eps))`` in one pass → ``(codes, token_scales)``."""
    return _layer_norm_quant_op(x, weight, bias, float(eps), str(quant_dtype), input_scale)
