"""layer_norm (Triton) vs eager ``F.layer_norm``: InternViT-300M norms (1024) and the projector's LN (4·3200)."""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import (  # noqa: F401 (cuda_fn is a fixture)
    C300M, C6B, IMPLS, cuda_fn, dtype_for, impl_label, row_fn, tiles_tokens,
)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

CASES = {"vit300m_norm": C300M, "projector_ln": 4 * C6B}

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.benchmark(group="layer_norm")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(CASES))
def test_layer_norm(request, bench_run, bench_device, full_shapes, case, impl):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    if case == "projector_ln":
        seq = 256 if full_shapes else 4  # tokens after the pixel shuffle
    C = CASES[case]
    g = dict(device=bench_device, dtype=dt)
    x, w, b = torch.randn(tiles, seq, C, **g), torch.randn(C, **g), torch.randn(C, **g)
    fn = row_fn(request, impl, F.layer_norm, ops.layer_norm, "layer_norm", x, w, b, 1e-6)
    bench_run(fn, x, w, b, 1e-6, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "case": case}, dtype=dt,
              impl=impl_label(impl, bench_device))
