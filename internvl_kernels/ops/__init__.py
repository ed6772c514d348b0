"""Kernel-backed ops for InternVL, one function per op (see each module's docstring).

Every function is a ``torch.library`` custom op in the ``internvl_kernels`` namespace (``torch.ops.internvl_kernels.<op>``)
with a fake implementation, so it traces under ``torch.compile(fullgraph=True)``. Which implementation runs is picked
per call by :mod:`internvl_kernels._backend` (``set_backend("auto"|"eager"|"triton"|"cuda")``, a context manager, or
``INTERNVL_KERNELS_BACKEND``): the eager reference (:mod:`internvl_kernels.model.functional`), the Triton kernels
(CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), or the CUDA extension where it registered the op and its
``can_implement`` accepts the call. ``python -m internvl_kernels`` prints each op's choice and the reasons.

The Triton wrappers launch on their inputs' device (``torch.cuda.device(x.device)``), so a model split over GPUs
works. Autotuned kernels (attention, linear, quant_matmul) benchmark their configurations on the first call of each
shape key; inside a CUDA-graph capture an untuned key launches a fixed configuration instead (one warning). Tune
ahead with :func:`warmup` (e.g. ``ops.warmup(model, pixel_values)``) before capturing.
"""
from __future__ import annotations

from ._common import launches, poison_outputs, warmup
from .add_layer_norm import add_layer_norm
from .add_rms_norm import add_rms_norm
from .attention import attention
from .layer_norm import layer_norm
from .int8_matmul import int8_matmul, int8_matmul_accumulate, int8_matmul_choices
from .linear import linear, linear_choices
from .norm_quant import add_layer_norm_quant, add_rms_norm_quant, layer_norm_quant, rms_norm_quant
from .mlp_projector import mlp_projector, projector_gemms
from .pixel_shuffle import pixel_shuffle, pixel_shuffle_layer_norm
from .qk_norm_attention import qk_norm_attention
from .quant_matmul import quant_matmul
from .quantize_per_token import quantize_per_token
from .rms_norm import rms_norm

# W8A8 (int8 / fp8 activations): norm + per-token quantization, per-token quantization, the scaled GEMM
W8A8_OPS = ("add_rms_norm_quant", "add_layer_norm_quant", "rms_norm_quant", "layer_norm_quant", "quantize_per_token",
            "int8_matmul", "int8_matmul_accumulate")

# op name (registry key of internvl_kernels._backend) for every custom op defined here
OPS = (
    "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "attention", "qk_norm_attention", "pixel_shuffle",
    "pixel_shuffle_layer_norm", "linear", "mlp_projector", "quant_matmul",
) + W8A8_OPS

__all__ = [
    "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "attention", "qk_norm_attention", "pixel_shuffle",
    "pixel_shuffle_layer_norm", "linear", "mlp_projector", "quant_matmul", "projector_gemms", "linear_choices", "poison_outputs",
    "launches", "warmup", "OPS",
] + list(W8A8_OPS) + ["int8_matmul_choices", "W8A8_OPS"]

# CUDA implementations register themselves (register_impl(op, "cuda", fn)); without the compiled extension
# _cuda logs one line and the Triton / eager implementations are used.
from . import _cuda  # noqa: E402,F401
