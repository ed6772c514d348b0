"""Eager PyTorch references for every op of the toolkit.

These functions are *the* definition of what each kernel computes. The reference model
(:mod:`internvl_kernels.model.vision`, :mod:`internvl_kernels.model.chat`) is written with them, the
``eager`` backend of :mod:`internvl_kernels.ops` calls them, and the parity tests compare the Triton / CUDA
kernels against them. They follow the official InternVL code's rounding exactly (Llama-style RMSNorm casting,
``attn * scale`` before the residual add, LayerNorm eps 1e-5 in the projector).

Tensor conventions: activations are ``[batch, seq, channels]``; attention inputs are ``[batch, seq, heads, head_dim]``;
Linear weights use ``nn.Linear``'s ``[out_features, in_features]`` layout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..quant import formats as _qformats

__all__ = [
    "rms_norm",
    "layer_norm",
    "add_rms_norm",
    "add_layer_norm",
    "attention",
    "qk_norm_attention",
    "pixel_shuffle",
    "pixel_shuffle_grid",
    "pixel_shuffle_layer_norm",
    "mlp_projector",
    "gelu",
    "linear",
    "dequantize_packed",
    "quant_matmul",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Llama-style RMSNorm: mean of squares in fp32, rsqrt, cast back to ``x.dtype``, then ``weight *``."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension (``torch.nn.functional.layer_norm``)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _residual_add(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    # Same rounding as the official block: ``hidden + attn_out * ls1`` (the product rounds to the dtype first).
    return residual + (x * scale if scale is not None else x)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``new_residual = residual + scale * x`` then ``rms_norm(new_residual)``; returns ``(new_residual, normed)``."""
    new_residual = _residual_add(x, residual, scale)
    return new_residual, rms_norm(new_residual, weight, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-6,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm twin of :func:`add_rms_norm`."""
    new_residual = _residual_add(x, residual, scale)
    return new_residual, layer_norm(new_residual, weight, bias, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal softmax attention as the official InternViT computes it.

    q, k, v: ``[B, S, H, D]``; returns ``[B, S, H, D]``. ``scale`` defaults to ``D ** -0.5``.
    Computed in the inputs' dtype: ``softmax((q * scale) @ k^T) @ v``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # B, H, S, D
    attn = (qh * scale) @ kh.transpose(-2, -1)
    attn = attn.softmax(dim=-1)
    return (attn @ vh).transpose(1, 2)


def qk_norm_attention(
    qkv: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    num_heads: int,
    eps: float = 1e-6,
    scale: float | None = None,
) -> torch.Tensor:
    """InternViT-6B attention from the packed qkv projection output.

    qkv: ``[B, S, 3C]`` laid out as (3, heads, head_dim) along the last dim. q and k are RMS-normalized over all
    ``C`` channels (not per head) before being split into heads. Returns the attention output ``[B, S, C]``
    (before the output projection).
    """
    B, S, C3 = qkv.shape
    C = C3 // 3
    D = C // num_heads
    q, k, v = qkv.reshape(B, S, 3, C).unbind(2)
    q = rms_norm(q, q_norm_weight, eps)
    k = rms_norm(k, k_norm_weight, eps)
    out = attention(q.reshape(B, S, num_heads, D), k.reshape(B, S, num_heads, D), v.reshape(B, S, num_heads, D), scale)
    return out.reshape(B, S, C)


def pixel_shuffle_grid(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """The official ``InternVLChatModel.pixel_shuffle`` on a ``[N, W, H, C]`` grid.

    v1 (V1.1 / V1.2) leaves the merged grid transposed; v2 (V1.5) transposes it back.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"pixel_shuffle: version must be 'v1' or 'v2', got {version!r}")
    n, w, h, c = x.shape
    r = round(1 / scale_factor)
    if abs(r * scale_factor - 1) > 1e-9 or h % r or w % r:
        raise ValueError(f"pixel_shuffle: grid {w}x{h} is not divisible by 1/scale_factor={1 / scale_factor}")
    x = x.reshape(n, w, h // r, c * r)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // r, w // r, c * r * r)
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v2") -> torch.Tensor:
    """Pixel-shuffle on a square token grid ``[B, N, C]`` (N = side²) → ``[B, N·s², C/s²]``."""
    B, N, C = x.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ValueError(f"pixel_shuffle: {N} tokens do not form a square grid (drop the cls token first)")
    y = pixel_shuffle_grid(x.reshape(B, side, side, C), scale_factor, version)
    return y.reshape(B, -1, y.shape[-1])


def pixel_shuffle_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    scale_factor: float = 0.5,
    version: str = "v2",
    eps: float = 1e-5,
) -> torch.Tensor:
    """``layer_norm(pixel_shuffle(x))``: the projector's first step straight from the ViT tokens ``[B, N, C]``."""
    return layer_norm(pixel_shuffle(x, scale_factor, version), weight, bias, eps)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, as ``nn.GELU()``."""
    return F.gelu(x)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str = "none") -> torch.Tensor:
    """``nn.Linear`` (``weight [out, in]``) with an optional exact-GELU epilogue (``activation="gelu"``)."""
    y = F.linear(x, weight, bias)
    return gelu(y) if activation == "gelu" else y


def mlp_projector(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float = 1e-5,
) -> torch.Tensor:
    """InternVL's ``mlp1``: LayerNorm → Linear → GELU(erf) → Linear, all with bias."""
    h = layer_norm(x, ln_weight, ln_bias, eps)
    h = F.linear(h, w1, b1)
    h = gelu(h)
    return F.linear(h, w2, b2)


def dequantize_packed(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                      bits: int, group_size: int, layout: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed checkpoint tensors of one Linear → float weight ``[out_features, in_features]`` (nn.Linear layout).

    ``W[n, k] = (q[n, k] - zero[g(k), n]) * scale[g(k), n]`` computed in fp32 (scales upcast from fp16), then cast to
    ``dtype``. ``layout`` is a format of :mod:`internvl_kernels.quant.formats` (``"gptq"`` = v1, ``"gptq_v2"``,
    ``"awq"``); ``g_idx=None`` means ``k // group_size`` (AWQ never has one).
    """
    return _qformats.get_format(layout).dequantize(qweight, qzeros, scales, g_idx, bits, group_size,
                                                   dtype=torch.float32).to(dtype)


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor | None, bits: int, group_size: int, layout: str,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only quantized Linear: dequantize in fp32, ``x.float() @ W.T (+ bias)`` in fp32, cast to ``x.dtype``."""
    w = dequantize_packed(qweight, scales, qzeros, g_idx, bits, group_size, layout, dtype=torch.float32)
    y = F.linear(x.to(torch.float32), w, None if bias is None else bias.to(torch.float32))
    return y.to(x.dtype)
