"""``rms_norm(x, weight, eps)``: Llama-style RMSNorm (InternViT-6B norm1/norm2, q_norm/k_norm, the LLM's norms).

Mean of squares in fp32, ``rsqrt``, cast to ``x.dtype``, then ``weight *`` — the same two roundings as the eager
reference, so fp32/fp16 results match it to the last bit up to the fp32 summation order (bf16 within one ulp under
the Triton interpreter, whose fp32→bf16 casts truncate). Output dtype: ``torch.promote_types(weight, x)`` like the
reference. Any leading shape; the last dim is normalized (any size up to 65536).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend
from ..model import functional as F_ref
from ._common import check_float, check_rank, check_same_device, check_vector, rows_2d
from ._common import on_input_device
from ._norm_kernel import norm_rows

OP = "rms_norm"


def _check(x: Tensor, weight: Tensor, eps: float) -> None:
    check_float(OP, "x", x)
    check_rank(OP, "x", x, range(1, 9))
    check_vector(OP, "weight", weight, x.shape[-1])
    check_same_device(OP, "x", x, weight=weight)
    if not eps >= 0:
        raise ValueError(f"{OP}: eps must be >= 0, got {eps}")


@on_input_device
def rms_norm_triton(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    x2 = rows_2d(x)
    y = norm_rows(OP, x2, weight, None, eps, is_rms=True, out_dtype=torch.promote_types(weight.dtype, x.dtype))
    return y.view(x.shape)


def rms_norm_eager(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    return F_ref.rms_norm(x, weight, eps).contiguous()


_backend.register_impl(OP, "eager", rms_norm_eager)
_backend.register_impl(OP, "triton", rms_norm_triton)


@torch.library.custom_op("internvl_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    _check(x, weight, eps)
    return _backend.dispatch(OP, x.device)(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    _check(x, weight, eps)
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype))


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Llama-casting RMSNorm over the last dim of ``x`` (see module docstring)."""
    return _rms_norm_op(x, weight, float(eps))
