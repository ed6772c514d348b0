"""``quantize_per_token(x, quant_dtype="int8", input_scale=None)`` → ``(codes, token_scales)``.

Dynamic symmetric per-token quantization of an activation (the input of a W8A8 Linear that has no norm before it:
InternViT's ``proj`` after attention, ``fc2`` after GELU). One pass: each program reads its rows once, computes the
row amax, the fp32 scale and the codes (round half to even). Definition: :func:`internvl_kernels.model.functional.
quantize_per_token`; kernel: :mod:`internvl_kernels.ops._norm_quant_kernel` without the norm.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import check_float, check_rank, rows_2d
from ._common import on_input_device
from ._norm_quant_kernel import norm_quant_rows
from .norm_quant import check_quant_args

OP = "quantize_per_token"
__all__ = ["quantize_per_token"]


def _check(x, quant_dtype, input_scale):
    check_float(OP, "x", x)
    check_rank(OP, "x", x, range(1, 9))
    check_quant_args(OP, x, quant_dtype, input_scale)


@on_input_device
def _triton(x, quant_dtype, input_scale):
    _, q, s = norm_quant_rows(OP, rows_2d(x), norm="none", quant_dtype=quant_dtype, y_dtype=x.dtype,
                              input_scale=input_scale)
    return q.view(x.shape), s.view(x.shape[:-1])


def _eager(x, quant_dtype, input_scale):
    q, s = F_ref.quantize_per_token(x, quant_dtype, input_scale)
    return q.contiguous(), s.contiguous()


_backend.register_impl(OP, "eager", _eager)
_backend.register_impl(OP, "triton", _triton)


@torch.library.custom_op("internvl_kernels::quantize_per_token", mutates_args=())
def _quantize_per_token_op(x: Tensor, quant_dtype: str, input_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check(x, quant_dtype, input_scale)
    return _backend.dispatch(OP, x.device)(x, quant_dtype, input_scale)


@_quantize_per_token_op.register_fake
def _(x, quant_dtype, input_scale):
    _check(x, quant_dtype, input_scale)
    return (x.new_empty(x.shape, dtype=F_ref.QUANT_DTYPES[quant_dtype]),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


def quantize_per_token(x: Tensor, quant_dtype: str = "int8", input_scale: Optional[Tensor] = None):
    """Per-token symmetric int8 / fp8 codes of ``x`` and their fp32 scales (``x ≈ codes * scales[..., None]``)."""
    return _quantize_per_token_op(x, str(quant_dtype), input_scale)
