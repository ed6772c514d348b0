"""W8A8 runtime: :class:`W8A8Linear` and the compressed-tensors (llm-compressor / vLLM) W8A8 checkpoint format.

**Module.** ``W8A8Linear`` holds the tensors under the names compressed-tensors stores for one Linear:

* ``weight``       — int8 (or float8_e4m3fn) codes ``[out, in]``, symmetric, one scale per output channel,
* ``weight_scale`` — float32 ``[out, 1]`` (``W ≈ weight * weight_scale``),
* ``input_scale``  — float32 ``[1]``, only with static per-tensor activation scales,
* ``bias``         — ``[out]`` in the model dtype.

``forward(x)`` quantizes ``x`` per token (:func:`internvl_kernels.ops.quantize_per_token`, or the static scale) and
runs :func:`internvl_kernels.ops.int8_matmul`; it also accepts a :class:`QuantizedActivation` (codes + scales
already produced by a fused norm, see :func:`internvl_kernels.patch_model`) and ``activation="gelu"`` (fc1).
With the eager backend this *is* the fake-quantized reference model (integer-exact accumulation).

**Format** (``quantization_config`` in config.json; names as compressed-tensors defines them)::

    {"quant_method": "compressed-tensors", "format": "int-quantized" | "float-quantized",
     "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": ["Linear"],
         "weights": {"num_bits": 8, "type": "int" | "float", "symmetric": true, "strategy": "channel",
                     "dynamic": false, ...},
         "input_activations": {"num_bits": 8, "type": "int" | "float", "symmetric": true,
                               "strategy": "token", "dynamic": true, ...}   # static: "tensor", false
     }},
     "ignore": [...modules kept in 16 bit...], "kv_cache_scheme": null}

:func:`apply_w8a8` (called by :func:`internvl_kernels.quant.loading.apply_quantization` for such a config) swaps
every Linear whose ``<name>.weight_scale`` is in the checkpoint for a ``W8A8Linear``.
"""
from __future__ import annotations

import logging
import re
from typing import NamedTuple

import torch
import torch.nn as nn

from .. import ops
from ..model import functional as F_ref

logger = logging.getLogger("internvl_kernels")

__all__ = ["W8A8Linear", "QuantizedActivation", "compressed_tensors_config", "parse_compressed_tensors_config",
           "apply_w8a8", "is_w8a8_config", "quantize_weight_per_channel"]

CT_FORMATS = {"int8": "int-quantized", "fp8": "float-quantized"}
_CT_TYPES = {"int8": "int", "fp8": "float"}


class QuantizedActivation(NamedTuple):
    """Per-token activation codes ``[..., K]`` and their fp32 scales ``[...]`` (a fused norm's output)."""

    codes: torch.Tensor
    scales: torch.Tensor


def quantize_weight_per_channel(weight: torch.Tensor, quant_dtype: str = "int8"):
    """Symmetric per-output-channel codes ``[out, in]`` and fp32 scales ``[out]`` (the rows of ``weight`` quantized
    exactly like tokens: :func:`internvl_kernels.model.functional.quantize_per_token`)."""
    return F_ref.quantize_per_token(weight.detach().to(torch.float32), quant_dtype)


class W8A8Linear(nn.Module):
    """int8 / fp8 weight + per-token int8 / fp8 activation Linear (compressed-tensors tensor names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_dtype: str = "int8",
                 static_input: bool = False, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if quant_dtype not in F_ref.QUANT_DTYPES:
            raise ValueError(f"W8A8Linear: quant_dtype must be one of {tuple(F_ref.QUANT_DTYPES)}, got {quant_dtype!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.quant_dtype = quant_dtype
        self.dtype = dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=F_ref.QUANT_DTYPES[quant_dtype],
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        if static_input:
            self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_dtype: str = "int8", input_scale: float | None = None):
        """Quantize an ``nn.Linear`` (per-channel symmetric weight; static ``input_scale`` or dynamic per token)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W8A8Linear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_dtype,
                input_scale is not None, w.dtype, device=w.device)
        q, s = quantize_weight_per_channel(w, quant_dtype)
        with torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale.copy_(s[:, None])
            if input_scale is not None:
                m.input_scale.fill_(float(input_scale))
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def _apply(self, fn, recurse=True):
        # codes and scales keep their dtypes under model.to(dtype) (fp8 codes are "floating point" for torch);
        # device moves still apply
        saved = {n: getattr(self, n) for n in ("weight", "weight_scale", "input_scale") if getattr(self, n) is not None}
        out = super()._apply(fn, recurse)
        for n, old in saved.items():
            t = getattr(self, n)
            if t.dtype != old.dtype:
                setattr(self, n, old.to(device=t.device))
        if self.bias is not None:
            self.dtype = self.bias.dtype
        return out

    def quantize_input(self, x: torch.Tensor) -> QuantizedActivation:
        return QuantizedActivation(*ops.quantize_per_token(x, self.quant_dtype, self.input_scale))

    def forward(self, x, activation: str = "none") -> torch.Tensor:
        qa = x if isinstance(x, QuantizedActivation) else self.quantize_input(x)
        return ops.int8_matmul(qa.codes, qa.scales, self.weight, self.weight_scale.view(-1), self.bias, activation,
                               self.dtype)

    def dequantize_weight(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.to(torch.float32) * self.weight_scale).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_dtype={self.quant_dtype!r}, act_scales={'static' if self.input_scale is not None else 'dynamic'}")


# ---------------------------------------------------------------------------------------------------- format
def compressed_tensors_config(quant_dtype: str = "int8", act_scales: str = "dynamic", ignore=(),
                              extra: dict | None = None) -> dict:
    """The ``quantization_config`` of a compressed-tensors W8A8 folder (see the module docstring)."""
    if quant_dtype not in CT_FORMATS:
        raise ValueError(f"quant_dtype must be one of {tuple(CT_FORMATS)}, got {quant_dtype!r}")
    if act_scales not in ("dynamic", "static"):
        raise ValueError(f"act_scales must be 'dynamic' or 'static', got {act_scales!r}")
    t = _CT_TYPES[quant_dtype]

    def args(strategy, dynamic, observer):
        return {"num_bits": 8, "type": t, "symmetric": True, "strategy": strategy, "dynamic": dynamic,
                "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
                "observer_kwargs": {}}

    static = act_scales == "static"
    cfg = {
        "quant_method": "compressed-tensors",
        "format": CT_FORMATS[quant_dtype],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": args("channel", False, "minmax"),
            "input_activations": args("tensor" if static else "token", not static, "minmax" if static else "memoryless"),
            "output_activations": None,
        }},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }
    if extra:
        cfg.update(extra)
    return cfg


def is_w8a8_config(d) -> bool:
    return isinstance(d, dict) and str(d.get("quant_method", "")).lower() == "compressed-tensors"


def parse_compressed_tensors_config(d: dict) -> dict:
    """``{"quant_dtype", "static_input", "ignore"}`` from a compressed-tensors config; clear errors otherwise."""
    from .formats import UnsupportedQuantizationError as E

    fmt = d.get("format")
    if fmt not in CT_FORMATS.values():
        raise E(f"compressed-tensors format {fmt!r} is not supported (supported: 'int-quantized', 'float-quantized' "
                "W8A8)")
    groups = d.get("config_groups") or {}
    if not isinstance(groups, dict) or len(groups) != 1:
        raise E(f"compressed-tensors: exactly one config group is supported, got {len(groups)}")
    (g,) = groups.values()
    w, a = g.get("weights") or {}, g.get("input_activations") or {}
    qd = "int8" if fmt == "int-quantized" else "fp8"
    for what, q in (("weights", w), ("input_activations", a)):
        if q.get("num_bits") != 8 or q.get("type") != _CT_TYPES[qd] or not q.get("symmetric", False):
            raise E(f"compressed-tensors {what}: need 8-bit symmetric {_CT_TYPES[qd]} for format {fmt!r}, got "
                    f"num_bits={q.get('num_bits')}, type={q.get('type')}, symmetric={q.get('symmetric')}")
    if w.get("strategy") != "channel":
        raise E(f"compressed-tensors weights strategy {w.get('strategy')!r} is not supported (per-output-channel "
                "'channel')")
    if a.get("strategy") == "token" and a.get("dynamic") is True:
        static = False
    elif a.get("strategy") == "tensor" and a.get("dynamic") is False:
        static = True
    else:
        raise E(f"compressed-tensors input_activations strategy={a.get('strategy')!r} dynamic={a.get('dynamic')!r} "
                "is not supported (dynamic 'token' or static 'tensor')")
    if g.get("targets") != ["Linear"]:
        raise E(f"compressed-tensors targets {g.get('targets')!r} are not supported (['Linear'])")
    return {"quant_dtype": qd, "static_input": static, "ignore": list(d.get("ignore") or [])}


def ignored(name: str, patterns) -> bool:
    """compressed-tensors' rule: an entry is an exact module name, or a regex after ``re:``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif name == p:
            return True
    return False


def _set_submodule(root, name, module):
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def apply_w8a8(model: nn.Module, quantization_config: dict, sd_parts: dict) -> dict:
    """Swap the Linears the checkpoint stores as W8A8 (``<name>.weight_scale`` present) for ``W8A8Linear``
    (built on the Linear's device — ``meta`` on a skeleton — ready for the strict load)."""
    from ..checkpoint.files import CheckpointError

    cfg = parse_compressed_tensors_config(quantization_config)
    want = F_ref.QUANT_DTYPES[cfg["quant_dtype"]]
    replaced = []
    for part, sd in sd_parts.items():
        sub = model if part == "" else model.get_submodule(part)
        prefix = f"{part}." if part else ""
        for key in sorted(k for k in sd if k.endswith(".weight_scale")):
            name = key[: -len(".weight_scale")]
            full = prefix + name
            try:
                mod = sub.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"checkpoint has {full}.weight_scale but the model has no module {full!r}") \
                    from None
            if not isinstance(mod, nn.Linear):
                raise CheckpointError(f"checkpoint has {full}.weight_scale but {full} is a {type(mod).__name__}")
            if ignored(full, cfg["ignore"]):
                raise CheckpointError(f"{full} is listed in the config's ignore list but stored quantized")
            w = sd.get(f"{name}.weight")
            if w is None or w.dtype != want:
                raise CheckpointError(f"{full}.weight must be {want} codes for format "
                                      f"{quantization_config.get('format')!r}, got "
                                      f"{None if w is None else w.dtype}")
            if tuple(w.shape) != (mod.out_features, mod.in_features):
                raise CheckpointError(f"{full}.weight: checkpoint shape {tuple(w.shape)} but the model's Linear is "
                                      f"[{mod.out_features}, {mod.in_features}]")
            s = sd[key]
            if s.dtype != torch.float32:
                sd[key] = s = s.to(torch.float32)
            if s.numel() != mod.out_features:
                raise CheckpointError(f"{full}.weight_scale has {s.numel()} values; per-channel needs "
                                      f"{mod.out_features}")
            sd[key] = s.reshape(mod.out_features, 1)
            if cfg["static_input"]:
                if f"{name}.input_scale" not in sd:
                    raise CheckpointError(f"{full}: static activation scales declared but no {full}.input_scale")
                sd[f"{name}.input_scale"] = sd[f"{name}.input_scale"].to(torch.float32).reshape(1)
            q = W8A8Linear(mod.in_features, mod.out_features, mod.bias is not None, cfg["quant_dtype"],
                           cfg["static_input"], mod.weight.dtype, device=mod.weight.device)
            _set_submodule(sub, name, q)
            replaced.append(full)
    logger.info("W8A8 runtime: %d Linear modules as %s (%s activation scales)", len(replaced), cfg["quant_dtype"],
                "static" if cfg["static_input"] else "dynamic per-token")
    model.quantization_summary = {"quantized_modules": replaced, "format": quantization_config.get("format"),
                                  "quant_dtype": cfg["quant_dtype"], "static_input": cfg["static_input"]}
    return model.quantization_summary
