"""``quantize.quantize_linear``: one Linear, any method — the layer-level entry point the rest of the code uses."""
from __future__ import annotations

import torch

from .awq import awq_quantize
from .gptq import Hessian, gptq_quantize
from .result import QuantResult
from .rtn import check_bits_group, rtn_quantize

__all__ = ["quantize_linear", "METHODS"]

METHODS = ("gptq", "awq", "rtn")


def _as_inputs(calib_inputs, in_features: int) -> torch.Tensor | None:
    if calib_inputs is None:
        return None
    if isinstance(calib_inputs, (list, tuple)):
        if not calib_inputs:
            return None
        calib_inputs = torch.cat([t.reshape(-1, t.shape[-1]) for t in calib_inputs], 0)
    if not isinstance(calib_inputs, torch.Tensor):
        raise TypeError(f"calib_inputs must be a tensor or a list of tensors, got {type(calib_inputs).__name__}")
    if calib_inputs.shape[-1] != in_features:
        raise ValueError(f"calib_inputs have {calib_inputs.shape[-1]} features, the weight has in_features={in_features}")
    x = calib_inputs.reshape(-1, in_features)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("calib_inputs contain NaN/Inf")
    return x


def quantize_linear(weight: torch.Tensor, calib_inputs=None, method: str = "gptq", bits: int = 4,
                    group_size: int = 128, sym: bool = False, act_order: bool = False, seed: int = 0, *,
                    static_groups: bool = False, damp: float = 0.1, blocksize: int = 128, min_zero: int = 0,
                    clip: bool = True, mse: bool = False, group_order: bool = True) -> QuantResult:
    """Quantize one ``nn.Linear`` weight ``[out, in]``.

    ``calib_inputs``: activations ``[..., in]`` (tensor or list of tensors) the Linear sees; required by gptq and
    awq, ignored by rtn. ``group_size=-1``: one group per row; a ``group_size`` that does not divide ``in`` gives a
    partial last group (GPTQ/RTN; AWQ-GEMM storage rejects it at packing time). ``min_zero=1`` keeps zero points
    storable in GPTQ v1. ``mse`` (GPTQ): MSE grid search of each group's range. ``group_order`` (GPTQ without
    ``act_order``, default on): group-aware reordering, natural ``g_idx`` (:func:`quantize.gptq.group_aware_order`). ``seed`` seeds torch's RNG for the call (the algorithms themselves are deterministic).

    Returns a :class:`quantize.result.QuantResult`: ``intweight``, ``scales``, ``zeros``, ``g_idx``,
    ``dequantized`` (same shape and dtype as ``weight``), ``input_scale`` (AWQ), ``pack(fmt)``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError("weight must be a 2-D floating-point tensor [out_features, in_features]")
    out_f, in_f = weight.shape
    check_bits_group(bits, group_size, in_f)
    if act_order and method != "gptq":
        raise ValueError(f"act_order is a GPTQ option; method {method!r} does not use it")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight contains NaN/Inf")
    torch.manual_seed(seed)
    if method == "rtn":
        return rtn_quantize(weight, bits, group_size, sym, min_zero)
    x = _as_inputs(calib_inputs, in_f)
    if x is None or x.shape[0] == 0:
        raise ValueError(f"method {method!r} needs calibration inputs (got none)")
    if method == "gptq":
        h = Hessian(in_f, device=weight.device)
        for chunk in torch.split(x, 8192):
            h.add(chunk)
        return gptq_quantize(weight, h.H, bits, group_size, sym, act_order, static_groups, damp, blocksize, min_zero,
                             mse, group_order=group_order)
    return awq_quantize(weight, x.to(weight.device), bits, group_size, sym, min_zero, clip)
