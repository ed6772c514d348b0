"""Round-to-nearest min/max quantization (the baseline) and the per-group parameter fit shared by all methods.

Parameters are fitted per output row and per group of input columns:

* ``style="gptq"`` (AutoGPTQ's quantizer, used by RTN and GPTQ): the range always contains 0
  (``xmin = min(w.min(), 0)``, ``xmax = max(w.max(), 0)``); symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``,
  zero = ``2**(bits-1)``; asymmetric: ``scale = (xmax - xmin) / maxq``, ``zero = round(-xmin / scale)``.
* ``style="awq"`` (AutoAWQ's pseudo-quantizer): asymmetric range ``[w.min(), w.max()]`` without forcing 0 inside,
  ``scale = max(xmax - xmin, 1e-5) / maxq``, ``zero = clamp(-round(xmin / scale), 0, maxq)``.

Scales are rounded to fp16 **before** the codes are computed, so codes, stored fp16 scales and the dequantized
weight agree exactly. ``min_zero=1`` keeps every zero point ≥ 1 (GPTQ v1 cannot store 0): where the fit gives
zero 0 the zero becomes 1 and the scale grows just enough to keep ``xmax`` representable.
"""
from __future__ import annotations

import torch

from ._threads import cpu_single_threaded
from .result import QuantResult

__all__ = ["fit_params", "fit_params_mse", "quantize_codes", "dequantize_codes", "rtn_quantize", "check_bits_group"]

_FP16_TINY = 2.0 ** -24  # smallest fp16 subnormal


def check_bits_group(bits: int, group_size: int, in_features: int) -> int:
    """Validate (bits, group_size) and return the effective group size (``in_features`` for -1)."""
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be one of 2, 3, 4, 8, got {bits!r}")
    if group_size in (-1, None, 0):
        return in_features
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1, got {group_size!r}")
    return group_size


def fit_params(w: torch.Tensor, bits: int, sym: bool, style: str = "gptq", min_zero: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row quantization parameters of ``w [rows, cols]`` → ``(scale [rows] fp32 (fp16-exact), zero [rows] fp32)``."""
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    if style == "gptq":
        xmin, xmax = _gptq_range(w, sym)
        scale = (xmax - xmin) / maxq
    elif style == "awq":
        xmin, xmax = w.amin(dim=1), w.amax(dim=1)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = torch.clamp(xmax - xmin, min=1e-5) / maxq
    else:
        raise ValueError(f"unknown parameter style {style!r}")
    return _params_from_range(xmin, xmax, scale, bits, sym, min_zero)


def _gptq_range(w: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's per-row range: [min, max] widened to include 0, symmetric if asked, (-1, 1) for all-zero rows."""
    xmin = torch.clamp(w.amin(dim=1), max=0)
    xmax = torch.clamp(w.amax(dim=1), min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    return xmin, xmax


def _params_from_range(xmin, xmax, scale, bits, sym, min_zero):
    maxq = (1 << bits) - 1
    scale = _fp16_exact(scale)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    if min_zero > 0:
        low = zero < min_zero
        if bool(low.any()):
            # zero 0 only happens when xmin > -scale/2: shift the grid by min_zero and widen it to keep xmax.
            need = _fp16_exact(torch.clamp(xmax, min=0) / (maxq - min_zero), up=True)
            scale = torch.where(low, torch.maximum(scale, need), scale)
            zero = torch.where(low, torch.full_like(zero, float(min_zero)), zero)
    return scale, zero


def fit_params_mse(w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0, grid: int = 100,
                   maxshrink: float = 0.8, norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoGPTQ's ``mse=True`` fit: shrink the (zero-including) range by ``p ∈ {1, 0.99, …, 1 − maxshrink}`` and
    keep, per row, the ``p`` minimising ``Σ|w − Q(w)|^norm``."""
    maxq = (1 << bits) - 1
    w = w.to(torch.float32)
    xmin0, xmax0 = _gptq_range(w, sym)
    best_s = best_z = best_e = None
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        xmin, xmax = p * xmin0, p * xmax0
        s, z = _params_from_range(xmin, xmax, (xmax - xmin) / maxq, bits, sym, min_zero)
        q = quantize_codes(w, s, z, bits)
        e = (dequantize_codes(q, s, z) - w).abs().pow(norm).sum(1)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            better = e < best_e
            best_s = torch.where(better, s, best_s)
            best_z = torch.where(better, z, best_z)
            best_e = torch.where(better, e, best_e)
    return best_s, best_z


def _fp16_exact(x: torch.Tensor, up: bool = False) -> torch.Tensor:
    """Round positive scales to fp16-representable fp32 values (``up``: never below ``x``)."""
    x = torch.clamp(x, min=_FP16_TINY, max=65504.0)
    y = x.to(torch.float16).to(torch.float32)
    if up:  # next fp16 value above y where rounding went down (fp16 ulp: 2**(e-11) for y in [2**(e-1), 2**e))
        _, e = torch.frexp(y)
        ulp = torch.exp2(torch.clamp(e.to(torch.float32) - 11, min=-24))
        y = torch.where(y < x, y + ulp, y)
    return y


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, maxq)`` with per-row ``scale``/``zero`` (broadcast over columns)."""
    maxq = (1 << bits) - 1
    if scale.dim() == w.dim() - 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return torch.clamp(torch.round(w.to(torch.float32) / scale) + zero, 0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if scale.dim() == q.dim() - 1:
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    return (q - zero) * scale


@cpu_single_threaded
def quantize_grouped(w: torch.Tensor, bits: int, group_size: int, sym: bool, style: str = "gptq", min_zero: int = 0,
                     clip: torch.Tensor | None = None):
    """Plain per-group RTN of ``w [out, in]`` with contiguous groups (partial last group allowed).

    ``clip`` [out, groups] optionally shrinks each group's range (AWQ clipping): the fit uses the weights clamped to
    ``clip * [min, max]``. Returns ``(codes [out,in] fp32, scales [G,out], zeros [G,out], dequant [out,in])``.
    All full groups are processed at once (``[out·G, group]`` rows), the partial last group separately.
    """
    out_f, in_f = w.shape
    gs = check_bits_group(bits, group_size, in_f)
    w = w.to(torch.float32)
    n_full = in_f // gs
    pieces = []  # (column slice, rows [out*g, cols], clip rows or None, groups in piece)
    if n_full:
        wf = w[:, :n_full * gs].reshape(out_f * n_full, gs)
        cf = clip[:, :n_full].reshape(-1, 1) if clip is not None else None
        pieces.append((slice(0, n_full * gs), wf, cf, n_full))
    if in_f % gs:
        wp = w[:, n_full * gs:]
        cp = clip[:, n_full:n_full + 1] if clip is not None else None
        pieces.append((slice(n_full * gs, in_f), wp, cp, 1))
    codes = torch.empty_like(w)
    deq = torch.empty_like(w)
    scales, zeros = [], []
    for cols, rows, c, ng in pieces:
        if c is not None:
            lo, hi = rows.amin(1, keepdim=True) * c, rows.amax(1, keepdim=True) * c
            rows = torch.maximum(torch.minimum(rows, hi), lo)
        s, z = fit_params(rows, bits, sym, style, min_zero)
        q = quantize_codes(rows, s, z, bits)
        codes[:, cols] = q.reshape(out_f, -1)
        deq[:, cols] = dequantize_codes(q, s, z).reshape(out_f, -1)
        scales.append(s.reshape(out_f, ng).t())
        zeros.append(z.reshape(out_f, ng).t())
    return codes, torch.cat(scales), torch.cat(zeros), deq


def rtn_quantize(weight: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False, min_zero: int = 0
                 ) -> QuantResult:
    """Round-to-nearest with per-group min/max (AutoGPTQ's parameter fit)."""
    out_f, in_f = weight.shape
    gs = check_bits_group(bits, group_size, in_f)
    codes, scales, zeros, _ = quantize_grouped(weight, bits, gs, sym, "gptq", min_zero)
    g_idx = torch.arange(in_f, device=weight.device, dtype=torch.int32) // gs
    return QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, bits=bits,
                       group_size=group_size if group_size not in (None, 0) else -1, sym=sym, method="rtn",
                       dtype=weight.dtype)
