"""add_rms_norm: one fused pass vs eager ``residual + x * ls`` then the norm (InternViT-6B blocks use RMSNorm);
eager / triton / cuda rows (:func:`_kernel_bench.residual_norm_bench`)."""
from __future__ import annotations

import pytest
from _kernel_bench import C6B, cuda_fn, residual_norm_bench  # noqa: F401 (cuda_fn: fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

test_add_rms_norm = residual_norm_bench("add_rms_norm", F.add_rms_norm, ops.add_rms_norm, C6B, with_bias=False)
