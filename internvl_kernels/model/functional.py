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
    "QUANT_DTYPES",
    "quant_max",
    "quantize_per_token",
    "add_rms_norm_quant",
    "add_layer_norm_quant",
    "rms_norm_quant",
    "layer_norm_quant",
    "int8_matmul_accumulate",
    "int8_matmul",
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


# ---------------------------------------------------------------------------------------------------------------
# W8A8: dynamic per-token activation quantization, norm + quantization, the scaled int8 / fp8 GEMM
# ---------------------------------------------------------------------------------------------------------------
# code dtype of each W8A8 flavour: symmetric int8 (codes -127..127) or fp8 e4m3 (OCP "fn": max 448, no inf)
QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_QMAX = {"int8": 127.0, "fp8": 448.0}
# a row of zeros gets scale AMAX_FLOOR / qmax (codes 0) instead of a division by zero
AMAX_FLOOR = 1e-12


def quant_max(quant_dtype: str) -> float:
    """Largest code magnitude: 127 (int8) or 448 (fp8 e4m3)."""
    if quant_dtype not in _QMAX:
        raise ValueError(f"quant_dtype must be one of {tuple(_QMAX)}, got {quant_dtype!r}")
    return _QMAX[quant_dtype]


def quantize_per_token(x: torch.Tensor, quant_dtype: str = "int8", input_scale: torch.Tensor | None = None):
    """Symmetric quantization of every row (token) of ``x`` → ``(codes, scales)``.

    Definition (everything in fp32, IEEE-rounded): ``scale = max(amax(|x_row|), AMAX_FLOOR) / qmax`` per token
    (or the given per-tensor ``input_scale``, broadcast to every token: static activation scales), then
    ``codes = clamp(x / scale, -qmax, qmax)`` rounded **half to even** (``torch.round``) to int8, or rounded to
    nearest-even by the fp32 → float8_e4m3fn cast. ``x ≈ codes * scale[..., None]``. Returns codes
    ``x.shape`` (int8 / float8_e4m3fn) and fp32 scales ``x.shape[:-1]``.
    """
    qmax = quant_max(quant_dtype)
    xf = x.to(torch.float32)
    if input_scale is None:
        scale = xf.abs().amax(-1).clamp_min(AMAX_FLOOR) / qmax
    else:
        scale = input_scale.to(torch.float32).reshape(()).expand(x.shape[:-1])
    v = (xf / scale[..., None]).clamp(-qmax, qmax)
    if quant_dtype == "int8":
        codes = torch.round(v).to(torch.int8)
    else:
        codes = v.to(torch.float8_e4m3fn)
    return codes, scale.contiguous()


def add_rms_norm_quant(x, residual, weight, eps: float = 1e-6, scale=None, quant_dtype: str = "int8",
                       input_scale=None):
    """:func:`add_rms_norm`, then :func:`quantize_per_token` of the normed output (rounded to its dtype first).

    Returns ``(new_residual, codes, token_scales)``: exactly what the unfused ops compute."""
    r, y = add_rms_norm(x, residual, weight, eps, scale)
    q, s = quantize_per_token(y, quant_dtype, input_scale)
    return r, q, s


def add_layer_norm_quant(x, residual, weight, bias, eps: float = 1e-6, scale=None, quant_dtype: str = "int8",
                         input_scale=None):
    """LayerNorm twin of :func:`add_rms_norm_quant`."""
    r, y = add_layer_norm(x, residual, weight, bias, eps, scale)
    q, s = quantize_per_token(y, quant_dtype, input_scale)
    return r, q, s


def rms_norm_quant(x, weight, eps: float = 1e-6, quant_dtype: str = "int8", input_scale=None):
    """``quantize_per_token(rms_norm(x))`` (the first block's norm1, which has no residual update before it)."""
    return quantize_per_token(rms_norm(x, weight, eps), quant_dtype, input_scale)


def layer_norm_quant(x, weight, bias, eps: float = 1e-6, quant_dtype: str = "int8", input_scale=None):
    """``quantize_per_token(layer_norm(x))``."""
    return quantize_per_token(layer_norm(x, weight, bias, eps), quant_dtype, input_scale)


def int8_matmul_accumulate(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact integer accumulator ``a @ w.T`` of int8 codes ``a [M, K]`` and ``w [N, K]`` as int32.

    Computed in float64 (every partial sum of int8 products is an integer below 2**53, so it is exact)."""
    return _exact_dot(a, w).to(torch.int32)


def _exact_dot(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w.T`` of code tensors, exact, as float64. int8: K split into chunks of 1024, each an fp32 GEMM (every
    partial sum is an integer of magnitude ≤ 1024·127² < 2**24, so fp32 is exact in any order), summed in float64.
    fp8: float64 GEMM (products of e4m3 values have ≤ 8 significant bits)."""
    if a.dtype != torch.int8:
        return a.to(torch.float64) @ w.to(torch.float64).t()
    K = a.shape[-1]
    acc = None
    for k0 in range(0, max(K, 1), 1024):
        p = (a[..., k0:k0 + 1024].to(torch.float32) @ w[:, k0:k0 + 1024].to(torch.float32).t()).to(torch.float64)
        acc = p if acc is None else acc + p
    return acc


def int8_matmul(a, a_scale, w, w_scale, bias=None, activation: str = "none", out_dtype=torch.bfloat16):
    """The W8A8 GEMM: ``act((a @ w.T) * a_scale[:, None] * w_scale[None, :] + bias)`` rounded once to ``out_dtype``.

    ``a`` ``[M, K]`` and ``w`` ``[N, K]`` codes (both int8, or both float8_e4m3fn), ``a_scale`` ``[M]`` fp32 (per token),
    ``w_scale`` ``[N]`` fp32 (per output channel), ``bias`` ``[N]``, ``activation`` "none" | "gelu" (exact erf).
    Epilogue order, all fp32: ``float(acc) * a_scale``, then ``* w_scale``, then ``+ bias``, then GELU, then the cast.
    int8: ``acc`` is the exact integer sum (converted to fp32 with round-to-nearest-even); fp8: the exact sum of the
    fp8 products (float64), which a tensor core reproduces up to its accumulation rounding.
    """
    acc = _exact_dot(a, w).to(torch.float32)
    y = acc * a_scale.to(torch.float32)[:, None]
    y = y * w_scale.to(torch.float32)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float32)
    if activation == "gelu":
        y = gelu(y)
    elif activation != "none":
        raise ValueError(f"int8_matmul: activation must be 'none' or 'gelu', got {activation!r}")
    return y.to(out_dtype)
