"""Quantized runtime: :class:`QuantLinear`, dequantization helpers and loaders for GPTQ / AWQ checkpoints.

* :class:`QuantLinear` — weight-only quantized Linear (buffers named like the checkpoint tensors); forward runs
  :func:`internvl_kernels.ops.quant_matmul`.
* :func:`dequantize` / :func:`quant_matmul_reference` — the eager definition (unpacking via :mod:`quantize.formats`).
* :func:`apply_quantization` — called by ``InternVLChatModel.from_pretrained`` when ``config.json`` has a
  ``quantization_config``; :func:`replace_with_quant_linear` — the module swap for any model;
  :func:`load_quantized_llm` — a plain transformers LLM folder (Llama / InternLM2) in GPTQ or AWQ layout;
  :func:`load_quantized_vit` — a standalone InternViT folder written quantized.
"""
from .dequant import dequantize, quant_matmul_reference, unpack
from .linear import QuantLinear
from .loading import (
    QuantConfig,
    apply_quantization,
    dequantize_model,
    load_quantized_llm,
    load_quantized_vit,
    model_nbytes,
    replace_with_quant_linear,
)

__all__ = [
    "QuantLinear",
    "QuantConfig",
    "dequantize",
    "dequantize_model",
    "quant_matmul_reference",
    "unpack",
    "apply_quantization",
    "replace_with_quant_linear",
    "load_quantized_llm",
    "load_quantized_vit",
    "model_nbytes",
]
