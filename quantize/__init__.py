"""GPTQ / AWQ / RTN quantizers for InternViT and the LLM of InternVL-Chat (``python -m quantize``).

Public API: :func:`quantize_linear` (one Linear), :class:`QuantResult`, :mod:`internvl_kernels.quant.formats` (bit-exact packers and
unpackers for GPTQ v1 / gptq_v2 / AWQ GEMM). The model pipeline and CLI live in :mod:`quantize.engine` and
:mod:`quantize.cli` (``python -m quantize --help``).
"""
import importlib

__all__ = ["quantize_linear", "QuantResult", "formats", "METHODS"]

# Imported on first use: ``python -m quantize`` starts with this file, and the CLI has to be able to catch a Ctrl-C
# during the (long) torch import and check its flags before it.
_LAZY = {"quantize_linear": (".linear", "quantize_linear"), "METHODS": (".linear", "METHODS"),
         "QuantResult": (".result", "QuantResult"), "formats": ("internvl_kernels.quant.formats", None)}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'quantize' has no attribute {name!r}")
    mod, attr = _LAZY[name]
    m = importlib.import_module(mod, __name__)
    value = m if attr is None else getattr(m, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
