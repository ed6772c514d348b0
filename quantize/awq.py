"""AWQ (Lin et al.): activation-aware per-input-channel scaling + clipping search, then round-to-nearest (docs/design.md §3).

Scale search, for a group of Linears that share one input ``x`` (e.g. q/k/v after ``input_layernorm``):

* ``x_mean = mean|x|`` per input channel, ``w_mean`` = mean over output rows of ``|w| / max|w|`` within each group;
* candidates ``s = x_mean^α / w_mean^(1−α)`` (``duo``; or ``x_mean^α``) for ``α ∈ {0, 0.05, …, 0.95}``, clamped to
  ≥ 1e-4 and normalized by ``sqrt(max(s)·min(s))``, plus ``s = 1`` (no scaling), so AWQ never does worse than RTN
  on the search objective;
* each candidate replaces every Linear of the group by ``Q(W·s)/s`` (Q = the AWQ min/max quantizer) and runs the
  caller's ``forward`` (the module that consumes the input: the whole attention for q/k/v, the MLP for gate/up, the
  Linear itself otherwise); the candidate with the lowest MSE against the float output wins.

The winner is folded into the preceding op by the model pipeline (``quantize.blocks``): RMSNorm/LayerNorm weight
(and bias) ``/= s``, or the rows of the preceding Linear (v → o, up → down) ``/= s``, and the Linears' columns ``*= s``.

Clipping search: per output row and group, shrink the range ``[min, max]`` by ``r ∈ {1, 0.95, …, 0.55}`` and keep the
``r`` minimising the group's output error ``eᵀ C_g e`` (``e = w − Q(clip(w))``, ``C_g`` the group's block of
``E[x xᵀ]``, i.e. the per-group output MSE AutoAWQ measures on sampled tokens, computed exactly from the Gram matrix).
Skipped for Linears that produce attention logits (q, k, packed qkv), as AutoAWQ does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ._threads import single_thread_on_cpu
from .result import QuantResult
from .rtn import check_bits_group, quantize_grouped

__all__ = ["awq_pseudo_quant", "weight_channel_mean", "search_scale", "search_clip", "awq_finalize", "awq_quantize",
           "ALPHA_GRID"]

ALPHA_GRID = tuple(i / 20 for i in range(20))


def awq_pseudo_quant(W: torch.Tensor, bits: int, group_size: int, sym: bool = False, min_zero: int = 0,
                     clip: torch.Tensor | None = None) -> torch.Tensor:
    """``Q(W)`` with AWQ's min/max quantizer (fp32 result)."""
    return quantize_grouped(W, bits, group_size, sym, "awq", min_zero, clip)[3]


def weight_channel_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over all output rows of ``|w| / max|w|`` (max within each row's group) → ``[in]``."""
    W = torch.cat([w.to(torch.float32) for w in weights], 0).abs()
    in_f = W.shape[1]
    gs = in_f if group_size in (-1, None, 0) else group_size
    out = torch.empty_like(W)
    for c in range(0, in_f, gs):
        blk = W[:, c:c + gs]
        out[:, c:c + gs] = blk / (blk.amax(1, keepdim=True) + 1e-6)
    return out.mean(0)


def search_scale(x_mean: torch.Tensor, weights: Sequence[torch.Tensor], forward: Callable[[list], torch.Tensor],
                 ref: torch.Tensor, bits: int, group_size: int, sym: bool = False, min_zero: int = 0,
                 duo: bool = True, grid: Sequence[float] = ALPHA_GRID) -> tuple[torch.Tensor, dict]:
    """Pick the input-channel scale ``s [in]`` minimising ``MSE(forward([Q(W·s)/s ...]), ref)``.

    ``forward`` receives the list of effective weights (same order as ``weights``) and returns an output comparable
    with ``ref``. Returns ``(s, info)`` where ``info`` holds the chosen α (None for s = 1) and the losses.
    """
    x_mean = x_mean.to(torch.float32).clamp_min(0)
    w_mean = weight_channel_mean(weights, group_size).to(x_mean.device) if duo else None
    ref = ref.to(torch.float32)
    best = (None, None, float("inf"))
    losses = {}
    candidates = [(None, torch.ones_like(x_mean))]
    for a in grid:
        s = x_mean.pow(a)
        if duo:
            s = s / (w_mean.pow(1 - a) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        candidates.append((a, s))
    for a, s in candidates:
        eff = [awq_pseudo_quant(w.to(torch.float32) * s[None, :], bits, group_size, sym, min_zero) / s[None, :]
               for w in weights]
        out = forward([e.to(w.dtype) for e, w in zip(eff, weights)])
        loss = float((out.to(torch.float32) - ref).pow(2).mean())
        if loss != loss:  # NaN
            continue
        losses["none" if a is None else f"{a:.2f}"] = loss
        if loss < best[2]:
            best = (a, s, loss)
    if best[1] is None:
        raise RuntimeError("AWQ: every scale candidate produced a NaN loss")
    return best[1], {"alpha": best[0], "loss": best[2], "loss_unscaled": losses.get("none")}


def search_clip(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool = False, min_zero: int = 0,
                n_grid: int = 20, max_shrink: float = 0.5, chunk: int = 4096) -> torch.Tensor:
    """Per (row, group) range shrink ratio ``[out, groups]`` minimising ``eᵀ C_g e`` (see module docstring)."""
    with single_thread_on_cpu(W.device):
        return _search_clip(W, H, bits, group_size, sym, min_zero, n_grid, max_shrink, chunk)


def _search_clip(W, H, bits, group_size, sym, min_zero, n_grid, max_shrink, chunk):
    out_f, in_f = W.shape
    gs = check_bits_group(bits, group_size, in_f)
    W = W.to(torch.float32)
    H = H.to(W.device, torch.float32)
    ratios = [1 - i / n_grid for i in range(int(max_shrink * n_grid))]
    groups = list(range(0, in_f, gs))
    best = torch.ones(out_f, len(groups), dtype=torch.float32, device=W.device)
    for gi, c0 in enumerate(groups):
        c1 = min(c0 + gs, in_f)
        C = H[c0:c1, c0:c1]
        for r0 in range(0, out_f, chunk):
            wg = W[r0:r0 + chunk, c0:c1]
            best_err = None
            for r in ratios:
                clip = torch.full((wg.shape[0], 1), r, device=W.device)
                dq = quantize_grouped(wg, bits, c1 - c0, sym, "awq", min_zero, clip)[3]
                e = wg - dq
                err = ((e @ C) * e).sum(1)
                if best_err is None:
                    best_err = err
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best[r0:r0 + chunk, gi] = torch.where(better, torch.full_like(err, r), best[r0:r0 + chunk, gi])
    return best


def awq_finalize(W_scaled: torch.Tensor, bits: int, group_size: int, sym: bool, clip: torch.Tensor | None,
                 min_zero: int = 0, dtype=None, input_scale: torch.Tensor | None = None, info: dict | None = None
                 ) -> QuantResult:
    """RTN codes of the (scaled) weight with the searched clipping → :class:`QuantResult`."""
    out_f, in_f = W_scaled.shape
    gs = check_bits_group(bits, group_size, in_f)
    codes, scales, zeros, _ = quantize_grouped(W_scaled, bits, gs, sym, "awq", min_zero, clip)
    g_idx = torch.arange(in_f, device=W_scaled.device, dtype=torch.int32) // gs
    return QuantResult(codes.to(torch.int32), scales, zeros.to(torch.int32), g_idx, bits=bits,
                       group_size=group_size if group_size not in (None, 0) else -1, sym=sym, method="awq",
                       dtype=dtype or W_scaled.dtype, input_scale=input_scale, info=dict(info or {}))


def awq_quantize(weight: torch.Tensor, x: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                 min_zero: int = 0, clip: bool = True, duo: bool = True) -> QuantResult:
    """AWQ on one Linear with calibration inputs ``x [..., in]`` (the scale is returned as ``input_scale``).

    The search objective is the Linear's own output ``x Wᵀ``. ``result.dequantized`` is the effective weight
    ``Q(W·s)/s``; ``result.dequantized_stored`` is ``Q(W·s)`` (what a model stores after folding ``1/s`` upstream).
    """
    out_f, in_f = weight.shape
    check_bits_group(bits, group_size, in_f)
    W = weight.detach().to(torch.float32)
    x = x.detach().reshape(-1, in_f).to(W.device, torch.float32)
    ref = x @ W.t()
    s, info = search_scale(x.abs().mean(0), [W], lambda ws: x @ ws[0].t(), ref, bits, group_size, sym, min_zero,
                           duo)
    Ws = W * s[None, :]
    if clip:
        xs = x / s[None, :]
        H = (xs.t() @ xs) / xs.shape[0]
        c = search_clip(Ws, H, bits, group_size, sym, min_zero)
    else:
        c = None
    return awq_finalize(Ws, bits, group_size, sym, c, min_zero, weight.dtype, input_scale=s, info=info)
