"""Loading GPTQ / AWQ checkpoints into the reference model (and plain transformers LLMs).

The rule: a Linear is quantized **iff** the checkpoint holds ``<name>.qweight``; it becomes a
:class:`~internvl_kernels.quant.QuantLinear` built on the model's device (``meta`` while ``from_pretrained`` builds
the skeleton) with the bits / group size / layout of ``quantization_config`` (per-module overrides from GPTQModel's
``dynamic`` field honoured), and the normal strict load then fills its buffers. Everything else loads as usual, so a
checkpoint may quantize the ViT, the LLM, both, or name skipped modules in ``modules_to_not_convert``.

InternLM2 LLMs (InternVL-Chat-V1.5, OpenGVLab's AWQ releases, our quantizer's output) store q, k and v as one
quantized ``attention.wqkv`` with GQA-interleaved output rows; the reference model runs the Llama layout, so the
quantized ``wqkv`` is split into ``q_proj`` / ``k_proj`` / ``v_proj`` with :func:`internvl_kernels.checkpoint.internlm2.split_quantized_wqkv`
(a pure selection of output columns: scales and GPTQ ``qweight`` are column slices, packed ``qzeros`` / AWQ
``qweight`` are unpacked and repacked; ``g_idx`` is shared). The three projections are exactly the rows of the
dequantized ``wqkv``.

Entry points:

* :func:`apply_quantization` — what ``InternVLChatModel.from_pretrained`` calls when ``config.json`` has a
  ``quantization_config`` (before the strict load, on the meta-device skeleton).
* :func:`replace_with_quant_linear` — the module swap for one (sub)model and its state dict.
* :func:`dequantize_model` — the "fake-quantized" float twin (QuantLinear → nn.Linear with the dequantized weight).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..checkpoint import internlm2
from ..checkpoint.config import read_quant_config
from ..checkpoint.files import CheckpointError
from . import formats
from .linear import QuantLinear

logger = logging.getLogger("internvl_kernels")

__all__ = ["QuantConfig", "UnsupportedQuantizationError", "apply_quantization", "replace_with_quant_linear",
           "dequantize_model", "model_nbytes", "split_quantized_wqkv_", "read_quant_config", "set_submodule",
           "has_quantized_wqkv"]


UnsupportedQuantizationError = formats.UnsupportedQuantizationError


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class QuantConfig:
    """The parts of a ``quantization_config`` (config.json) / ``quantize_config.json`` the runtime needs."""

    quant_method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    layout: str  # "gptq" (v1) | "gptq_v2" | "awq"
    desc_act: bool = False
    sym: bool = True
    modules_to_not_convert: list = field(default_factory=list)
    quantized_modules: list | None = None
    dynamic: dict | None = None
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise UnsupportedQuantizationError(f"quantization_config must be a dict, got {type(d).__name__}")
        method = str(d.get("quant_method", "")).lower()
        if method == "gptq":
            fmt = str(d.get("checkpoint_format") or d.get("format") or "gptq").lower()
            if fmt not in formats.FORMATS or formats.get_format(fmt).quant_method != "gptq":
                raise UnsupportedQuantizationError(
                    f"GPTQ checkpoint_format {fmt!r} is not supported (supported: 'gptq' = v1, 'gptq_v2'); "
                    "marlin / bitblas re-packed checkpoints must be saved back in GPTQ format")
            layout = fmt
        elif method == "awq":
            version = str(d.get("version", "gemm")).lower()
            if version not in ("gemm", "exllama"):
                raise UnsupportedQuantizationError(
                    f"AWQ version {version!r} is not supported: only GEMM-packed checkpoints ('gemm'; 'exllama' "
                    "checkpoints use the same packing) — GEMV packs differently")
            if d.get("zero_point", True) is False:
                raise UnsupportedQuantizationError("AWQ with zero_point=false is not supported (GEMM stores zeros)")
            layout = "awq"
        else:
            raise UnsupportedQuantizationError(
                f"quant_method {d.get('quant_method')!r} is not supported (supported: 'gptq', 'awq')")
        bits = d.get("bits", d.get("w_bit"))
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in formats.SUPPORTED_BITS:
            raise UnsupportedQuantizationError(f"quantization_config bits={bits!r} is not supported "
                                               f"{formats.SUPPORTED_BITS}")
        why = formats.get_format(layout).bits_reason(bits)
        if why:
            raise UnsupportedQuantizationError(why)
        gs = d.get("group_size", d.get("q_group_size", 128))
        if gs is None:
            gs = -1
        if isinstance(gs, bool) or not isinstance(gs, int) or (gs <= 0 and gs != -1):
            raise UnsupportedQuantizationError(f"quantization_config group_size={gs!r} must be a positive int or -1")
        skip = d.get("modules_to_not_convert") or []
        if isinstance(skip, str):
            skip = [skip]
        return cls(quant_method=method, bits=bits, group_size=gs, layout=layout, desc_act=bool(d.get("desc_act")),
                   sym=bool(d.get("sym", True)), modules_to_not_convert=list(skip),
                   quantized_modules=list(d["quantized_modules"]) if d.get("quantized_modules") else None,
                   dynamic=d.get("dynamic") or None, raw=dict(d))

    @classmethod
    def coerce(cls, cfg) -> "QuantConfig":
        return cfg if isinstance(cfg, QuantConfig) else cls.from_dict(cfg)

    def skipped(self, name: str) -> bool:
        """transformers' rule: a module is left unconverted when any ``modules_to_not_convert`` entry is a
        substring of its dotted name (``dynamic`` ``-:`` patterns too)."""
        if any(s and s in name for s in self.modules_to_not_convert):
            return True
        for pat in (self.dynamic or {}):
            if pat.startswith("-:") and re.match(pat[2:], name):
                return True
        return False

    def for_module(self, name: str) -> tuple[int, int]:
        """``(bits, group_size)`` of module ``name`` (GPTQModel ``dynamic`` overrides: ``{"[+:]regex": {...}}``)."""
        bits, gs = self.bits, self.group_size
        for pat, over in (self.dynamic or {}).items():
            if pat.startswith("-:"):
                continue
            rx = pat[2:] if pat.startswith("+:") else pat
            if re.match(rx, name) and isinstance(over, dict):
                bits = int(over.get("bits", bits))
                gs = int(over.get("group_size", gs))
                break
        return bits, gs


# ---------------------------------------------------------------------------------------------------------------
# memory accounting
# ---------------------------------------------------------------------------------------------------------------
def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shape × element size; works on meta tensors; tied tensors once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _fmt_bytes(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------------------------
# InternLM2 packed wqkv
# ---------------------------------------------------------------------------------------------------------------
_WQKV = re.compile(r"^(.*)attention\.wqkv\.qweight$")


def has_quantized_wqkv(state_dict: dict) -> bool:
    """Whether ``state_dict`` holds a quantized InternLM2 ``attention.wqkv``."""
    return any(_WQKV.match(k) for k in state_dict)


def split_quantized_wqkv_(state_dict: dict, llm_config, cfg: QuantConfig) -> list[str]:
    """In place: every quantized InternLM2 ``<p>attention.wqkv.{qweight,qzeros,scales,g_idx}`` →
    ``<p>self_attn.{q,k,v}_proj.*`` (Llama layout). A ``wqkv.bias`` left in the dict is split by rows too.
    Returns the converted prefixes."""
    done = []
    for key in [k for k in state_dict if _WQKV.match(k)]:
        p = _WQKV.match(key).group(1)
        base = f"{p}attention.wqkv."
        bits, _ = cfg.for_module(base[:-1])
        t = {n: state_dict.pop(base + n) for n in ("qweight", "qzeros", "scales", "g_idx") if base + n in state_dict}
        if base + "bias" in state_dict:
            t["bias"] = state_dict.pop(base + "bias")
        nh, nkv, hd = internlm2.heads(llm_config)
        try:
            q, k, v = internlm2.split_quantized_wqkv(t, nh, nkv, hd, cfg.layout, bits)
        except ValueError as e:
            raise CheckpointError(f"{base[:-1]}: cannot split the quantized wqkv into q/k/v ({e})") from e
        for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
            for n, tensor in part.items():
                state_dict[f"{p}self_attn.{name}.{n}"] = tensor
        done.append(base[:-1])
    return done


# ---------------------------------------------------------------------------------------------------------------
# module swap
# ---------------------------------------------------------------------------------------------------------------
def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _check_g_idx(g: torch.Tensor, K: int, n_groups: int, full: str, error) -> None:
    """A stored ``g_idx`` is ``[in_features]`` integers in ``[0, groups)``; else ``error`` naming the layer."""
    if g.is_floating_point() or g.dtype == torch.bool:
        raise error(f"{full}.g_idx must be an integer tensor, got {g.dtype}")
    if tuple(g.shape) != (K,):
        raise error(f"{full}.g_idx: checkpoint shape {tuple(g.shape)} but the Linear has {K} input features")
    if g.numel() and not g.is_meta:
        lo, hi = int(g.min()), int(g.max())
        if lo < 0 or hi >= n_groups:
            raise error(f"{full}.g_idx: values must lie in [0, {n_groups}) ({full}.scales has {n_groups} groups), "
                        f"got [{lo}, {hi}]")


def replace_with_quant_linear(model: nn.Module, quantization_config, state_dict: dict, *, name_prefix: str = "",
                              tie_word_embeddings: bool = False) -> list[str]:
    """Swap every ``nn.Linear`` of ``model`` whose ``<name>.qweight`` is in ``state_dict`` for a QuantLinear.

    The QuantLinear is created on the Linear's device (``meta`` on a skeleton) with its dtype (for the bias) and the
    checkpoint's scales dtype; shapes are checked against bits / group size / layout with errors naming the module.
    ``state_dict`` is completed in place where a checkpoint omits ``g_idx`` (GPTQ without act-order).
    ``name_prefix`` is only used in messages and for the skip lists (full dotted names). Returns the swapped names.
    """
    cfg = QuantConfig.coerce(quantization_config)
    names = sorted(k[: -len(".qweight")] for k in state_dict if k.endswith(".qweight"))
    replaced = []
    for name in names:
        full = name_prefix + name
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"checkpoint has {full}.qweight but the model has no module {full!r}") from None
        if isinstance(mod, QuantLinear):
            continue
        if not isinstance(mod, nn.Linear):
            raise CheckpointError(f"checkpoint has {full}.qweight but {full} is a {type(mod).__name__}, not a Linear")
        if f"{name}.weight" in state_dict:
            if tie_word_embeddings and name.endswith("lm_head"):
                state_dict.pop(f"{name}.weight")  # the loader's tied-embedding fill-in; the checkpoint quantized it
            else:
                raise CheckpointError(f"checkpoint has both {full}.weight and {full}.qweight")
        if cfg.skipped(full):
            logger.warning("%s is listed in modules_to_not_convert but the checkpoint stores it quantized "
                           "(%s.qweight); loading it quantized", full, full)
        bits, gs = cfg.for_module(full)
        K, N = mod.in_features, mod.out_features
        try:
            want = formats.packed_shapes(K, N, bits, gs, cfg.layout)
        except ValueError as e:
            raise CheckpointError(f"{full}: a [{N}, {K}] Linear cannot be stored as {cfg.layout} {bits}-bit "
                                  f"group_size={gs}: {e}") from None
        for t in ("qweight", "qzeros", "scales"):
            key = f"{name}.{t}"
            if key not in state_dict:
                raise CheckpointError(f"{full}: checkpoint has {full}.qweight but no {full}.{t}")
            got = tuple(state_dict[key].shape)
            if got != want[t]:
                hint = ""
                if t == "qweight" and formats.get_format(cfg.layout).has_g_idx and (got[0] * 32) % K == 0 and got[1] == N:
                    hint = f" (its shape implies {got[0] * 32 // K}-bit)"
                raise CheckpointError(f"{full}.{t}: checkpoint shape {got} but {cfg.layout} {bits}-bit "
                                      f"group_size={gs} for a [{N}, {K}] Linear needs {want[t]}{hint}")
            if t != "scales" and state_dict[key].dtype != torch.int32:
                raise CheckpointError(f"{full}.{t} must be int32, got {state_dict[key].dtype}")
        fmt = formats.get_format(cfg.layout)
        if fmt.has_g_idx and f"{name}.g_idx" not in state_dict:
            state_dict[f"{name}.g_idx"] = fmt.default_g_idx(K, gs)
        if not fmt.has_g_idx and f"{name}.g_idx" in state_dict:
            raise CheckpointError(f"{full}.g_idx present in an AWQ checkpoint (AWQ has no g_idx)")
        if f"{name}.g_idx" in state_dict:
            _check_g_idx(state_dict[f"{name}.g_idx"], K, state_dict[f"{name}.scales"].shape[0], full, CheckpointError)
            if state_dict[f"{name}.g_idx"].dtype != torch.int32:
                state_dict[f"{name}.g_idx"] = state_dict[f"{name}.g_idx"].to(torch.int32)
        dev = mod.weight.device
        q = QuantLinear(K, N, bits, gs, cfg.layout, bias=mod.bias is not None, dtype=mod.weight.dtype, device=dev,
                        scales_dtype=state_dict[f"{name}.scales"].dtype)
        set_submodule(model, name, q)
        replaced.append(full)
    return replaced


def apply_quantization(model: nn.Module, quantization_config, state_dict: dict | None = None, *,
                       sd_parts: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """Prepare ``model`` (usually a meta-device skeleton) for a quantized checkpoint, before its strict load.

    ``sd_parts`` maps a submodule name (``"vision_model"``, ``"mlp1"``, ``"language_model"``; ``""`` = the model
    itself) to that submodule's state dict (keys relative to it); ``state_dict`` alone means ``{"": state_dict}``.
    The dicts are edited in place (quantized InternLM2 ``wqkv`` split into q/k/v; missing GPTQ ``g_idx`` filled in);
    load them into the model afterwards. Logs and returns the model's bytes before (dense-equivalent) and after.
    """
    if sd_parts is None:
        if state_dict is None:
            raise ValueError("apply_quantization: pass state_dict or sd_parts")
        sd_parts = {"": state_dict}
    from .w8a8 import apply_w8a8, is_w8a8_config

    if is_w8a8_config(quantization_config):  # compressed-tensors W8A8 (int8 / fp8 weights and activations)
        return apply_w8a8(model, quantization_config, sd_parts)
    cfg = QuantConfig.coerce(quantization_config)
    before = model_nbytes(model)
    replaced, split = [], []
    for part, sd in sd_parts.items():
        sub = model if part == "" else model.get_submodule(part)
        prefix = f"{part}." if part else ""
        sub_cfg = getattr(sub, "config", None)
        if has_quantized_wqkv(sd):
            if sub_cfg is None:
                raise CheckpointError(f"{prefix}: quantized attention.wqkv found but the module has no config "
                                          "to read the head counts from")
            split += [prefix + s for s in split_quantized_wqkv_(sd, sub_cfg, cfg)]
        tie = bool(getattr(sub_cfg, "tie_word_embeddings", False)) if sub_cfg is not None else False
        replaced += replace_with_quant_linear(sub, cfg, sd, name_prefix=prefix, tie_word_embeddings=tie)
    if cfg.quantized_modules:
        missing = [m for m in cfg.quantized_modules if not _listed_present(m, replaced, split)]
        if missing:
            logger.warning("quantization_config.quantized_modules names %d module(s) with no qweight in the "
                           "checkpoint: %s", len(missing), missing[:5])
    after = model_nbytes(model)
    summary = {"quantized_modules": replaced, "split_wqkv": split, "bytes_before": before, "bytes_after": after,
               "layout": cfg.layout, "bits": cfg.bits, "group_size": cfg.group_size}
    logger.info("quantized runtime: %d Linear modules as %s %d-bit group_size=%d%s; model bytes on device "
                "%s dense-equivalent (%s) -> %s quantized (%.2fx smaller)", len(replaced), cfg.layout, cfg.bits,
                cfg.group_size, f", {len(split)} InternLM2 wqkv split into q/k/v" if split else "",
                _fmt_bytes(before), str(dtype).replace("torch.", "") if dtype is not None else "model dtype",
                _fmt_bytes(after), before / after if after else float("inf"))
    model.quantization_config = cfg
    model.quantization_summary = summary
    return summary


def _listed_present(name: str, replaced: list[str], split: list[str]) -> bool:
    if name in split or name in replaced:
        return True
    # names in checkpoint (InternLM2) layout vs the converted Llama layout
    tail = internlm2.to_llama_name(name.split(".")[-1] if name.split(".")[-1] == "output" else name).split(".")[-1]
    return any(r.endswith("." + tail) or r == tail for r in replaced)


# ---------------------------------------------------------------------------------------------------------------
# fake-quantized twin
# ---------------------------------------------------------------------------------------------------------------
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """In place: every QuantLinear → ``nn.Linear`` holding its dequantized weight (``dtype`` default: the module's)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            set_submodule(model, name, mod.to_linear(dtype))
    return model
