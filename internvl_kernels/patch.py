"""Swap the reference model's hot paths for the kernel-backed ops of :mod:`internvl_kernels.ops`.

``patch_model(model)`` works on an :class:`~internvl_kernels.model.InternVLChatModel`, a standalone
:class:`~internvl_kernels.model.InternVisionModel`, transformers' own ``InternVLForConditionalGeneration`` /
``InternVLModel`` / ``InternVLVisionModel`` (the "-hf" checkpoints of InternVL2.5 / 3), a bare transformers Llama /
Qwen2 / Phi-3 LLM, or any module containing them (loaded by ``from_pretrained`` or built in memory). It is **non-destructive**: every patched module keeps its
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
* **LLM norms** (``llm_norms=True``): every ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` / ``Phi3RMSNorm`` →
  :func:`internvl_kernels.ops.rms_norm`.
* **transformers' InternVL**: ``InternVLVisionLayer`` / ``InternVLVisionEncoder`` get the same fused chain
  (``layernorm_before/after``, ``lambda_1/2`` as the layer scales); its separate ``q_proj``/``k_proj``/``v_proj``
  outputs feed ``qk_norm_attention`` through one concatenated ``[B, N, 3C]`` activation (6B shape; the weights stay
  separate) or ``attention`` directly (300M shape). While transformers records per-layer outputs
  (``output_hidden_states``, a ``vision_feature_layer`` other than -1) each layer runs on its own so its hooks fire.
  ``InternVLModel.get_image_features`` fuses pixel-shuffle into the ``multi_modal_projector``'s LayerNorm.

The ops dispatch by the backend switch (:func:`internvl_kernels.set_backend`): on CPU tensors with the default
``auto`` backend they run the eager references, so a patched model is always safe to run.
"""
from __future__ import annotations

import threading

import torch
import torch.nn as nn

from . import ops
from .model.chat import InternVLChatModel
from .model.vision import InternAttention, InternRMSNorm, InternVisionEncoder, InternVisionEncoderLayer
from .ops.attention import SUPPORTED_HEAD_DIMS
from .options import check_qk_norm

try:  # the LLM's norm class
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
except Exception:  # pragma: no cover - transformers without Llama
    LlamaRMSNorm = None


def _optional(module: str, *names: str):
    try:
        mod = __import__(module, fromlist=list(names))
        return tuple(getattr(mod, n) for n in names)
    except Exception:  # pragma: no cover - a transformers without that model
        return (None,) * len(names)


# the other LLMs' norms (same math as LlamaRMSNorm: fp32 mean of squares, cast back, then × weight)
(Qwen2RMSNorm,) = _optional("transformers.models.qwen2.modeling_qwen2", "Qwen2RMSNorm")
(Phi3RMSNorm,) = _optional("transformers.models.phi3.modeling_phi3", "Phi3RMSNorm")
# transformers' own InternVL ("-hf" checkpoints)
(HFVisionRMSNorm, HFVisionAttention, HFVisionLayer, HFVisionEncoder, HFInternVLModel, HFProjector) = _optional(
    "transformers.models.internvl.modeling_internvl", "InternVLVisionRMSNorm", "InternVLVisionAttention",
    "InternVLVisionLayer", "InternVLVisionEncoder", "InternVLModel", "InternVLMultiModalProjector")
_LLM_RMS_NORMS = tuple(c for c in (LlamaRMSNorm, Qwen2RMSNorm, Phi3RMSNorm) if c is not None)

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


def _rms_eps(norm: nn.Module):
    """eps of an RMSNorm this module fuses (InternViT's or transformers' InternVL vision one), else None."""
    if isinstance(norm, InternRMSNorm):
        return norm.eps
    if HFVisionRMSNorm is not None and isinstance(norm, HFVisionRMSNorm):
        return norm.variance_epsilon
    return None


def _norm(norm: nn.Module, x: torch.Tensor, quant_for=None) -> torch.Tensor:
    if quant_for is not None and isinstance(norm, (nn.LayerNorm, InternRMSNorm)):
        qd, isc = quant_for.quant_dtype, quant_for.input_scale
        if isinstance(norm, nn.LayerNorm):
            return _quantized(*ops.layer_norm_quant(x, norm.weight, norm.bias, norm.eps, qd, isc))
        return _quantized(*ops.rms_norm_quant(x, norm.weight, norm.eps, qd, isc))
    if isinstance(norm, nn.LayerNorm):
        y = ops.layer_norm(x, norm.weight, norm.bias, norm.eps)
    elif _rms_eps(norm) is not None:
        y = ops.rms_norm(x, norm.weight, _rms_eps(norm))
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
    elif _rms_eps(norm) is not None:
        x, h = ops.add_rms_norm(out, x, norm.weight, _rms_eps(norm), scale)
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
                                    attn.scale, qk_norm=getattr(attn, _QK_NORM_ATTR, None))
    else:
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)
        out = ops.attention(q, k, v, attn.scale).reshape(B, N, C)
    return attn.proj(out)


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear


def _exact_gelu(m) -> bool:
    if type(m) is nn.GELU:
        return m.approximate == "none"
    # transformers' ACT2FN["gelu"] (GELUActivation wrapping the exact erf F.gelu)
    return type(m).__name__ == "GELUActivation" and getattr(m, "act", None) is torch.nn.functional.gelu


def _hf_attention(attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """transformers' ``InternVLVisionAttention``: separate q/k/v projections, optional QK-norm over all channels."""
    if attn.head_dim not in SUPPORTED_HEAD_DIMS:
        return attn(h)[0]
    B, N, C = h.shape
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    qn, kn = attn.q_norm, attn.k_norm
    if isinstance(qn, nn.Identity) and isinstance(kn, nn.Identity):
        shape = (B, N, attn.num_heads, attn.head_dim)
        out = ops.attention(q.view(shape), k.view(shape), v.view(shape), attn.scale).reshape(B, N, C)
    elif _rms_eps(qn) is not None and _rms_eps(kn) == _rms_eps(qn):
        # the fused kernel reads q, k, v out of one [B, N, 3C] buffer (one activation copy; the weights stay apart)
        out = ops.qk_norm_attention(torch.cat([q, k, v], dim=-1), qn.weight, kn.weight, attn.num_heads, _rms_eps(qn),
                                    attn.scale)
    else:
        return attn(h)[0]
    return attn.projection_dropout(attn.projection_layer(out))


def _hf_projector(proj: nn.Module, tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    """pixel-shuffle (v2 order, as transformers' ``InternVLModel.pixel_shuffle``) + ``InternVLMultiModalProjector``."""
    ln, fc1, act, fc2 = proj.layer_norm, proj.linear_1, proj.act, proj.linear_2
    h = ops.pixel_shuffle_layer_norm(tokens, ln.weight, ln.bias, ratio, "v2", ln.eps)
    if _plain_linear(fc1) and _exact_gelu(act) and _plain_linear(fc2):
        return ops.projector_gemms(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return fc2(act(fc1(h)))


def _mlp(mlp: nn.Module, h: torch.Tensor) -> torch.Tensor:
    act = getattr(mlp, "act", None) or getattr(mlp, "activation_fn", None)  # InternViT's / transformers' name
    if _w8a8(mlp.fc1) is not None and _exact_gelu(act):  # int8 GEMM with the bias + GELU epilogue
        return mlp.fc2(mlp.fc1(h, activation="gelu"))
    if _plain_linear(mlp.fc1) and _exact_gelu(act):
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


class _KernelHFVisionLayer:
    """Mixin for transformers' ``InternVLVisionLayer`` (``layernorm_before/after``, ``lambda_1/2``)."""

    def _ik_step(self, x, h, next_norm):
        a = _hf_attention(self.attention, h)
        x, h2 = _add_norm(a, x, self.lambda_1, self.layernorm_after)
        m = _mlp(self.mlp, h2)
        return _add_norm(m, x, self.lambda_2, next_norm)

    def forward(self, hidden_states):
        if self.training:  # dropout lives in the original forward
            return super().forward(hidden_states)
        return self._ik_step(hidden_states, _norm(self.layernorm_before, hidden_states), None)[0]


def _first_norm(layer):
    return layer.norm1 if hasattr(layer, "norm1") else layer.layernorm_before


def _run_blocks(layers, h, states=None):
    layers = list(layers)
    if not layers:
        return h
    first = _qkv_consumer(layers[0]) if isinstance(layers[0], _KernelEncoderLayer) else None
    normed = _norm(_first_norm(layers[0]), h, first)
    for i, layer in enumerate(layers):
        nxt = _first_norm(layers[i + 1]) if i + 1 < len(layers) else None
        consumer = None
        if nxt is not None and isinstance(layers[i + 1], _KernelEncoderLayer):
            consumer = _qkv_consumer(layers[i + 1])
        if isinstance(layer, _KernelEncoderLayer):
            h, normed = layer._ik_step(h, normed, nxt, consumer)
        elif isinstance(layer, _KernelHFVisionLayer):
            h, normed = layer._ik_step(h, normed, nxt)
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


def _capturing_outputs() -> bool:
    """True while transformers records per-layer outputs (``output_hidden_states`` / ``output_attentions``) through
    forward hooks on the layers: the fused chain, which never calls a layer module, would skip them."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except Exception:  # pragma: no cover - older transformers: be safe, call the layers
        return True
    collected = _active_collector.get()
    return bool(collected) and any(k in collected for k in ("hidden_states", "attentions"))


class _KernelHFVisionEncoder:
    """Mixin for transformers' ``InternVLVisionEncoder``: the fused chain unless layer outputs are being recorded
    (then each patched layer runs on its own, so transformers' hooks see every layer)."""

    def forward(self, hidden_states):
        from transformers.modeling_outputs import BaseModelOutput

        if self.training or _capturing_outputs():
            for layer in self.layer:
                hidden_states = layer(hidden_states)
        else:
            hidden_states = _run_blocks(self.layer, hidden_states)
        return BaseModelOutput(last_hidden_state=hidden_states)


class _KernelHFInternVLModel:
    """Mixin for transformers' ``InternVLModel``: ``get_image_features`` with pixel-shuffle fused into the projector's
    LayerNorm and the projector GEMMs with bias + GELU epilogues (same selection rules as the original)."""

    def get_image_features(self, pixel_values, vision_feature_layer=None, vision_feature_select_strategy=None,
                           **kwargs):
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = (self.config.vision_feature_select_strategy if vision_feature_select_strategy is None
                    else vision_feature_select_strategy)
        proj = self.multi_modal_projector
        if not isinstance(layer, int) or not isinstance(proj.layer_norm, nn.LayerNorm):
            return super().get_image_features(pixel_values, vision_feature_layer, vision_feature_select_strategy,
                                              **kwargs)
        kwargs.pop("return_dict", None)
        pixel_values = pixel_values.to(dtype=self.dtype)
        if layer == -1:
            out = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
            feats = out.last_hidden_state
        else:
            kwargs["output_hidden_states"] = True
            out = self.vision_tower(pixel_values=pixel_values, return_dict=True, **kwargs)
            feats = out.hidden_states[layer]
        if strategy == "default":
            feats = feats[:, 1:, :]
        out.pooler_output = _hf_projector(proj, feats, self.config.downsample_ratio)
        return out


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


_KernelHFVisionRMSNorm = _KernelLlamaRMSNorm  # same attributes (weight, variance_epsilon), same math


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
        if HFVisionLayer is not None:
            rules += [(HFVisionEncoder, _KernelHFVisionEncoder), (HFVisionLayer, _KernelHFVisionLayer),
                      (HFVisionRMSNorm, _KernelHFVisionRMSNorm)]
    if projector:
        rules.append((InternVLChatModel, _KernelChatModel))
        if HFInternVLModel is not None:
            rules.append((HFInternVLModel, _KernelHFInternVLModel))
    if llm_norms:
        rules += [(c, _KernelLlamaRMSNorm) for c in _LLM_RMS_NORMS]
    return rules


_QK_NORM_ATTR = "_ik_qk_norm"


def patch_model(model: nn.Module, *, vision: bool = True, projector: bool = True, llm_norms: bool = True,
                qk_norm: str | None = None):
    """Switch ``model``'s modules to the kernel-backed forwards (in place; returns ``model``). See module docs.

    ``qk_norm`` (``"fold"`` | ``"exact"``; ``None`` = the process default of
    :func:`internvl_kernels.options.set_qk_norm`) is how the ViT's ``qk_norm_attention`` applies the k norm."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model expects a torch.nn.Module, got {type(model).__name__}")
    if qk_norm is not None:
        qk_norm = check_qk_norm(qk_norm)
    rules = _rules(vision, projector, llm_norms)
    for _, mod in model.named_modules():
        if vision and qk_norm is not None and isinstance(mod, InternAttention):
            object.__setattr__(mod, _QK_NORM_ATTR, qk_norm)
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
        mod.__dict__.pop(_QK_NORM_ATTR, None)
    return model


def patched_modules(model: nn.Module) -> list[str]:
    """Names of the modules currently patched (``""`` is the root)."""
    return [name for name, mod in model.named_modules() if is_patched(mod)]
