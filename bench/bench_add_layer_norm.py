"""add_layer_norm: one fused pass vs eager ``residual + x * ls`` then the norm (InternViT-300M blocks use LayerNorm);
eager / triton / cuda rows (:func:`_kernel_bench.residual_norm_bench`)."""
from __future__ import annotations

import pytest
from _kernel_bench import C300M, cuda_fn, residual_norm_bench  # noqa: F401 (cuda_fn: fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

test_add_layer_norm = residual_norm_bench("add_layer_norm", F.add_layer_norm, ops.add_layer_norm, C300M, with_bias=True)
