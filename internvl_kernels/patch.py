"""Swap the reference model's hot paths for the kernel-backed ops of :mod:`internvl_kernels.ops`.

``patch_model(model)`` works on an :class:`~internvl_kernels.model.InternVLChatModel`, a standalone
:class:`~internvl_kernels.model.InternVisionModel`, a bare transformers Llama LLM, or any module containing them
(loaded by ``from_pretrained`` or built in memory). It is **non-destructive**: every patched module keeps its
identity, parameters, buffers and ``state_dict`` keys; only its class is switched to a subclass whose ``forward``
calls the fused ops (``module.__class__ = Kernel<Original>``). :func:`unpatch_model` switches the classes back, so
the model is exactly the original again. Patching twice is a no-op. No weight is copied.

What changes:

* **ViT blocks** (``vision=True``): the encoder runs as a chain in which every residual update is fused with the
  next norm — ``x, h = add_rms_norm(attn_out, x, norm2.weight, eps, scale=ls1)`` then
  ``x, h = add_rms_norm(mlp_out, x, next_layer.norm1.weight, eps, scale=ls2)`` (``add_layer_norm`` for the
  LayerNorm / 300M shape) — attention is ``qk_norm_attention`` straight from the packed qkv output (6B shape) or
  ``attention`` on strided q/k/v views (300M shape), and ``fc1`` + GELU is one ``linear(..., "gelu")`` (cuBLAS or
  Triton, whichever is faster). ``qkv``/``proj``/``fc2`` stay the modules they are (so quantized Linears keep working).
  **W8A8 towers** (``W8A8Linear`` from a compressed-tensors folder): a norm feeding a W8A8 ``qkv`` / ``fc1`` becomes
  ``rms_norm_quant`` / ``add_rms_norm_quant`` (``add_layer_norm_quant``), emitting int8 / fp8 codes + per-token
  scales in the same pass; ``fc1`` is ``int8_matmul`` with the bias + GELU epilogue; ``proj`` / ``fc2`` quantize
  their inputs with ``quantize_per_token``.
* **Projector** (``projector=True``): ``pixel_shuffle_and_project`` becomes ``pixel_shuffle_layer_norm`` (the
  shuffled copy never exists) followed by the two GEMMs with bias + GELU epilogues.
* **LLM norms** (``llm_norms=True``): every ``LlamaRMSNorm`` → :func:`internvl_kernels.ops.rms_norm`.

The ops dispatch by the backend switch (:func:`internvl_kernels.set_backend`): on CPU tensors with the default
``auto`` backend they run the eager references, so a patched model is always safe to run.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from . import ops
from .model.chat import InternVLChatModel
from .model.vision import InternRMSNorm, InternVisionEncoder, InternVisionEncoderLayer
from .ops.attention import SUPPORTED_HEAD_DIMS

try:  # the LLM's norm class
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
except Exception:  # pragma: no cover - transformers without Llama
    LlamaRMSNorm = None

__all__ = ["patch_model", "unpatch_model", "is_patched", "patched_modules"]


# ----------------------------------------------------------------------------------------------- the fused pieces
def _w8a8(m):
    """``m`` if it is a W8A8Linear (int8 / fp8 activations: its input can come quantized from a fused norm)."""
    from .quant.w8a8 import W8A8Linear

    return m if isinstance(m, W8A8Linear) else None


def _qkv_consumer(layer):
    """The W8A8 qkv Linear fed by ``layer.norm1`` on the kernel path (None: norm1 emits a float activation)."""
    attn = getattr(layer, "attn", None)
    if attn is None or attn.head_dim not in SUPPORTED_HEAD_DIMS:
        return None
    return _w8a8(attn.qkv)


def _quantized(codes, scales):
    from .quant.w8a8 import QuantizedActivation

    return QuantizedActivation(codes, scales)


def _norm(norm: nn.Module, x: torch.Tensor, quant_for=None) -> torch.Tensor:
    if quant_for is not None and isinstance(norm, (nn.LayerNorm, InternRMSNorm)):
        qd, isc = quant_for.quant_dtype, quant_for.input_scale
        if isinstance(norm, nn.LayerNorm):
            return _quantized(*ops.layer_norm_quant(x, norm.weight, norm.bias, norm.eps, qd, isc))
        return _quantized(*ops.rms_norm_quant(x, norm.weight, norm.eps, qd, isc))
    if isinstance(norm, nn.LayerNorm):
        y = ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    elif isinstance(norm, InternRMSNorm):
        y = ops.rms_norm(x, norm.weight, norm.eps)
    else:
        y = norm(x)
    return y.to(x.dtype)


def _add_norm(out: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, norm: nn.Module | None, quant_for=None):
    """``x + out * scale`` (the block's rounding) and the next norm of it; ``norm=None`` → no norm.
    ``quant_for``: the W8A8Linear that consumes the norm — the norm then emits its int8 / fp8 codes + scales."""
    if norm is None:
        return x + out * scale, None
    if quant_for is not None and isinstance(norm, (nn.LayerNorm, InternRMSNorm)):
        qd, isc = quant_for.quant_dtype, quant_for.input_scale
        if isinstance(norm, nn.LayerNorm):
            x, q, s = ops.add_layer_norm_quant(out, x, norm.weight, norm.bias, norm.eps, scale, qd, isc)
        else:
            x, q, s = ops.add_rms_norm_quant(out, x, norm.weight, norm.eps, scale, qd, isc)
        return x, _quantized(q, s)
    if isinstance(norm, nn.LayerNorm):
        x, h = ops.add_layer_norm(out, x, norm.weight, norm.bias, norm.eps, scale)
    elif isinstance(norm, InternRMSNorm):
        x, h = ops.add_rms_norm(out, x, norm.weight, norm.eps, scale)
    else:
        x = x + out * scale
        h = norm(x)
    return x, h.to(x.dtype)


def _attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if attn.head_dim not in SUPPORTED_HEAD_DIMS:
        return attn(h)  # the eager module (the Triton kernel covers head_dim 64 / 128)
    B, N, C = (h.codes if hasattr(h, "codes") else h).shape  # a W8A8 qkv gets its input quantized
    qkv = attn.qkv(h)
    if attn.qk_normalization:
        out = ops.qk_norm_attention(qkv, attn.q_norm.weight, attn.k_norm.weight, attn.num_heads, attn.q_norm.eps,
                                    attn.scale)
    else:
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
        out = ops.attention(q, k, v, attn.scale).reshape(B, N, C)
    return attn.proj(out)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear


def _exact_gelu(m) -> bool:
    return type(m) is nn.GELU and m.approximate == "none"


def _mlp(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if _w8a8(mlp.fc1) is not None and _exact_gelu(mlp.act):  # int8 GEMM with the bias + GELU epilogue
        return mlp.fc2(mlp.fc1(h, activation="gelu"))
    if _plain_linear(mlp.fc1) and _exact_gelu(mlp.act):
        return mlp.fc2(ops.linear(h, mlp.fc1.weight, mlp.fc1.bias, "gelu"))
    return mlp(h)


# ------------------------------------------------------------------------------------------- patched subclasses
class _KernelEncoderLayer:
    """Mixin for ``InternVisionEncoderLayer``: one block as fused steps."""

    def _ik_step(self, x, h, next_norm, next_consumer=None):
        """Block on residual ``x`` whose ``norm1(x)`` is ``h``; returns ``(x_out, next_norm(x_out) or None)``.
        ``next_consumer``: the next block's W8A8 qkv (then ``next_norm`` emits its quantized input)."""
        a = _attention(self.attn, h)
        x, h2 = _add_norm(a, x, self.ls1, self.norm2, _w8a8(self.mlp.fc1))
        m = _mlp(self.mlp, h2)
        return _add_norm(m, x, self.ls2, next_norm, next_consumer)

    def forward(self, hidden_states):
        return self._ik_step(hidden_states, _norm(self.norm1, hidden_states, _qkv_consumer(self)), None)[0]


def _run_blocks(layers, h, states=None):
    layers = list(layers)
    if not layers:
        return h
    first = _qkv_consumer(layers[0]) if isinstance(layers[0], _KernelEncoderLayer) else None
    normed = _norm(layers[0].norm1, h, first)
    for i, layer in enumerate(layers):
        nxt = layers[i + 1].norm1 if i + 1 < len(layers) else None
        consumer = None
        if nxt is not None and isinstance(layers[i + 1], _KernelEncoderLayer):
            consumer = _qkv_consumer(layers[i + 1])
        if isinstance(layer, _KernelEncoderLayer):
            h, normed = layer._ik_step(h, normed, nxt, consumer)
        else:  # a block someone left unpatched
            h = layer(h)
            normed = _norm(nxt, h, consumer) if nxt is not None else None
        if states is not None:
            states.append(h)
    return h


class _KernelEncoder:
    """Mixin for ``InternVisionEncoder``: the blocks as one fused chain (residual add + next norm per step)."""

    def forward(self, hidden_states, num_layers=None, states=None):
        return _run_blocks(self.layers[:num_layers], hidden_states, states)


class _KernelChatModel:
    """Mixin for ``InternVLChatModel``: pixel-shuffle fused with the projector's LayerNorm, GEMM epilogues."""

    def pixel_shuffle_and_project(self, vit_tokens):
        seq = self.mlp1
        if not (isinstance(seq, nn.Sequential) and len(seq) == 4 and isinstance(seq[0], nn.LayerNorm)):
            return super().pixel_shuffle_and_project(vit_tokens)
        ln, fc1, act, fc2 = seq
        h = ops.pixel_shuffle_layer_norm(vit_tokens, ln.weight, ln.bias, self.downsample_ratio, self.ps_version,
                                         ln.eps)
        if _plain_linear(fc1) and _exact_gelu(act) and _plain_linear(fc2):
            return ops.projector_gemms(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return fc2(act(fc1(h)))


class _KernelInternRMSNorm:
    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class _KernelLlamaRMSNorm:
    def forward(self, hidden_states):
        return ops.rms_norm(hidden_states, self.weight, self.variance_epsilon)


# ---------------------------------------------------------------------------------------------- class swapping
_CLASSES: dict = {}
_LOCK = threading.Lock()


def _kernel_class(mixin: type, base: type) -> type:
    """``Kernel<Base>`` = (mixin, base), created once and registered here so patched models still pickle."""
    with _LOCK:
        cls = _CLASSES.get((mixin, base))
        if cls is None:
            name = f"Kernel{base.__name__}"
            while name in globals():
                name += "_"
            cls = type(name, (mixin, base), {"_ik_base": base, "__module__": __name__, "__qualname__": name})
            globals()[name] = cls
            _CLASSES[(mixin, base)] = cls
        return cls


def is_patched(module: nn.Module) -> bool:
    return "_ik_base" in type(module).__dict__


def _swap(module: nn.Module, mixin: type) -> bool:
    if is_patched(module):
        return False
    module.__class__ = _kernel_class(mixin, type(module))
    return True


def _rules(vision: bool, projector: bool, llm_norms: bool):
    rules = []
    if vision:
        rules += [(InternVisionEncoder, _KernelEncoder), (InternVisionEncoderLayer, _KernelEncoderLayer),
                  (InternRMSNorm, _KernelInternRMSNorm)]
    if projector:
        rules.append((InternVLChatModel, _KernelChatModel))
    if llm_norms and LlamaRMSNorm is not None:
        rules.append((LlamaRMSNorm, _KernelLlamaRMSNorm))
    return rules


def patch_model(model: nn.Module, *, vision: bool = True, projector: bool = True, llm_norms: bool = True):
    """Switch ``model``'s modules to the kernel-backed forwards (in place; returns ``model``). See module docs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}")
    rules = _rules(vision, projector, llm_norms)
    for _, mod in model.named_modules():
        for base, mixin in rules:
            if isinstance(mod, base):
                _swap(mod, mixin)
                break
    return model


def unpatch_model(model: nn.Module):
    """Undo :func:`patch_model`: every patched module gets its original class back (in place; returns ``model``)."""
    for _, mod in model.named_modules():
        while is_patched(mod):
            mod.__class__ = type(mod).__dict__["_ik_base"]
    return model


def patched_modules(model: nn.Module) -> list[str]:
    """Names of the modules currently patched (``""`` is the root)."""
    return [name for name, mod in model.named_modules() if is_patched(mod)]
