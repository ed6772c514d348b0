"""Quantized runtime: the on-disk formats, :class:`QuantLinear` and the module swap for GPTQ / AWQ checkpoints.

* :mod:`internvl_kernels.quant.formats` — every on-disk layout (GPTQ v1 / gptq_v2 / AWQ GEMM) as a typed
  :class:`~internvl_kernels.quant.formats.QuantFormat`: packing, unpacking, shapes, ``g_idx``, ``can_store``, the
  ``quantization_config`` JSON. It imports torch only.
* :class:`QuantLinear` — weight-only quantized Linear (buffers named like the checkpoint tensors); forward runs
  :func:`internvl_kernels.ops.quant_matmul`.
* :func:`dequantize` / :func:`quant_matmul_reference` — the eager definitions
  (:func:`internvl_kernels.model.functional.dequantize_packed` / :func:`~internvl_kernels.model.functional.quant_matmul`).
* :func:`apply_quantization` — the module swap a model loader calls when ``config.json`` has a
  ``quantization_config``; :func:`replace_with_quant_linear` — the swap for any model and its state dict.
  The loaders themselves live with the models: :func:`internvl_kernels.model.load_quantized_llm`,
  :func:`internvl_kernels.model.load_quantized_vit`, ``InternVLChatModel.from_pretrained``.

Attributes are imported on first use, so ``import internvl_kernels.quant.formats`` loads no kernel and no model.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "internvl_kernels.quant.formats": ("formats", "QuantFormat", "get_format", "FORMATS"),
    "internvl_kernels.quant.linear": ("QuantLinear",),
    "internvl_kernels.quant.loading": ("QuantConfig", "UnsupportedQuantizationError", "apply_quantization",
                                       "replace_with_quant_linear", "dequantize_model", "model_nbytes",
                                       "read_quant_config"),
}

__all__ = sorted([name for names in _EXPORTS.values() for name in names] + ["dequantize", "quant_matmul_reference",
                                                                             "unpack"])
__getattr__ = lazy_exports(__name__, {name: mod for mod, names in _EXPORTS.items() for name in names})


def unpack(qweight, qzeros, bits: int, layout: str):
    """Packed tensors → ``(intweight [out, in] int32, true zeros [groups, out] int32)`` (see :mod:`.formats`)."""
    from .formats import get_format

    return get_format(layout).unpack(qweight, qzeros, bits)


def dequantize(qweight, scales, qzeros, g_idx, bits: int, group_size: int, layout: str, dtype=None):
    """The eager dequantization (:func:`internvl_kernels.model.functional.dequantize_packed`)."""
    import torch

    from ..model.functional import dequantize_packed

    return dequantize_packed(qweight, scales, qzeros, g_idx, bits, group_size, layout, dtype or torch.float32)


def quant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits: int, group_size: int, layout: str, bias=None):
    """The eager definition of ``quant_matmul`` (:func:`internvl_kernels.model.functional.quant_matmul`)."""
    from ..model.functional import quant_matmul

    return quant_matmul(x, qweight, scales, qzeros, g_idx, bits, group_size, layout, bias=bias)
