"""rms_norm (Triton) vs eager PyTorch (the Llama-casting reference): InternViT-6B norms and an LLM norm.

Memory-bound: GB/s counts one read of x and one write of y; target on an H100 ≥ 90% of the measured copy bandwidth.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import (  # noqa: F401 (cuda_fn is a fixture)
    C6B, I6B, IMPLS, LLM_HIDDEN, cuda_fn, dtype_for, impl_label, row_fn, tiles_tokens,
)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

CASES = {"vit6b_norm": C6B, "vit6b_mlp_width": I6B, "llm_norm": LLM_HIDDEN}

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.benchmark(group="rms_norm")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_rms_norm(request, bench_run, bench_device, full_shapes, case, impl):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = CASES[case] if full_shapes else min(CASES[case], 3200)
    x = torch.randn(tiles, seq, C, device=bench_device, dtype=dt)
    w = torch.randn(C, device=bench_device, dtype=dt)
    fn = row_fn(request, impl, F.rms_norm, ops.rms_norm, "rms_norm", x, w, 1e-6)
    bench_run(fn, x, w, 1e-6, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "case": case}, dtype=dt,
              impl=impl_label(impl, bench_device))
