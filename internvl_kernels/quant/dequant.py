"""Dequantization helpers and the eager reference of :func:`internvl_kernels.ops.quant_matmul`.

Every unpack goes through :mod:`quantize.formats` (the one definition of the packed layouts); this module only maps
the runtime's ``layout`` names (``"gptq"`` = GPTQ v1, ``"gptq_v2"``, ``"awq"``) onto it and does the float math.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dequantize", "unpack", "quant_matmul_reference", "LAYOUTS"]

LAYOUTS = ("gptq", "gptq_v2", "awq")


def _formats():
    from quantize import formats

    return formats


def unpack(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed tensors → ``(intweight [out, in] int32, true zeros [groups, out] int32)``.

    Unpacking is :mod:`quantize.formats`' (the one definition of the layouts)."""
    fm = _formats()
    if layout == "awq":
        return fm.unpack_awq(qweight, qzeros, bits)
    if layout in ("gptq", "gptq_v2"):
        return fm.unpack_gptq(qweight, qzeros, bits, 1 if layout == "gptq" else 2)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
               bits: int, group_size: int, layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed checkpoint tensors of one Linear → float weight ``[out_features, in_features]`` (nn.Linear layout).

    ``W[n, k] = (q[n, k] - zero[g(k), n]) * scale[g(k), n]`` computed in fp32 (scales upcast from fp16), then cast to
    ``dtype``. ``g_idx=None`` means ``k // group_size`` (AWQ never has one).
    """
    fm = _formats()
    if layout == "awq":
        if g_idx is not None:
            raise ValueError("dequantize: AWQ has no g_idx")
        return fm.dequantize_awq(qweight, qzeros, scales, group_size, bits, dtype=dtype)
    if layout not in ("gptq", "gptq_v2"):
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if g_idx is None:
        in_f = qweight.shape[0] * 32 // bits
        g_idx = fm.make_g_idx(in_f, group_size, device=qweight.device)
    return fm.dequantize_gptq(qweight, qzeros, scales, g_idx, bits, 1 if layout == "gptq" else 2, dtype=dtype)


def quant_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                           g_idx: torch.Tensor | None, bits: int, group_size: int, layout: str,
                           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The definition of ``quant_matmul``: dequantize in fp32, ``x.float() @ W.T (+ bias)`` in fp32, cast to x.dtype."""
    w = dequantize(qweight, scales, qzeros, g_idx, bits, group_size, layout, dtype=torch.float32)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
