"""GPTQ / AWQ / RTN quantizers for InternViT and the LLM of InternVL-Chat (``python -m quantize``).

Public API: :func:`quantize_linear` (one Linear), :class:`QuantResult`, :mod:`internvl_kernels.quant.formats` (bit-exact packers and
unpackers for GPTQ v1 / gptq_v2 / AWQ GEMM). The model pipeline and CLI live in :mod:`quantize.engine` and
:mod:`quantize.cli` (``python -m quantize --help``).
"""
from internvl_kernels.quant import formats
from .linear import METHODS, quantize_linear
from .result import QuantResult

__all__ = ["quantize_linear", "QuantResult", "formats", "METHODS"]
