"""add_rms_norm / add_layer_norm (one fused pass) vs eager ``residual + x * ls`` followed by the norm.

GB/s counts the fused op's traffic (read x and residual, write the new residual and the normed output: 4 tensors);
the eager rows move the same useful bytes in five kernels (mul, add, norm).
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, C300M, dtype_for, impl_label, pinned, tiles_tokens

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.benchmark(group="add_norm")
@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_add_norm(bench_run, bench_device, full_shapes, op, impl):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = C6B if op == "add_rms_norm" else C300M  # 6B blocks use RMSNorm, 300M blocks LayerNorm
    g = dict(device=bench_device, dtype=dt)
    x, res = torch.randn(tiles, seq, C, **g), torch.randn(tiles, seq, C, **g)
    w, b, ls = torch.randn(C, **g), torch.randn(C, **g), torch.randn(C, **g)
    if op == "add_rms_norm":
        fn, args = (F.add_rms_norm if impl == "eager" else ops.add_rms_norm), (x, res, w, 1e-6, ls)
    else:
        fn, args = (F.add_layer_norm if impl == "eager" else ops.add_layer_norm), (x, res, w, b, 1e-6, ls)
    bench_run(pinned(fn, impl), *args, bytes_moved=4 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C}, dtype=dt, impl=impl_label(impl, bench_device))
