"""add_layer_norm (one fused pass) vs eager ``residual + x * ls`` followed by the LayerNorm.

GB/s counts the fused op's traffic (read x and residual, write the new residual and the normed output: 4 tensors);
the eager rows move the same useful bytes in five kernels (mul, add, norm).
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import (  # noqa: F401 (cuda_fn is a fixture)
    C300M, cuda_fn, dtype_for, impl_label, pinned, tiles_tokens,
)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.benchmark(group="add_layer_norm")
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_add_layer_norm(bench_run, bench_device, full_shapes, impl):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = C300M  # 300M blocks use LayerNorm
    g = dict(device=bench_device, dtype=dt)
    x, res = torch.randn(tiles, seq, C, **g), torch.randn(tiles, seq, C, **g)
    w, b, ls = torch.randn(C, **g), torch.randn(C, **g), torch.randn(C, **g)
    fn, args = (F.add_layer_norm if impl == "eager" else ops.add_layer_norm), (x, res, w, b, 1e-6, ls)
    bench_run(pinned(fn, impl), *args, bytes_moved=4 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C}, dtype=dt, impl=impl_label(impl, bench_device))


@pytest.mark.gpu
@pytest.mark.benchmark(group="add_layer_norm")
def test_add_layer_norm_cuda(bench_run, bench_device, full_shapes, cuda_fn):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = C300M
    g = dict(device=bench_device, dtype=dt)
    x, res = torch.randn(tiles, seq, C, **g), torch.randn(tiles, seq, C, **g)
    w, b, ls = torch.randn(C, **g), torch.randn(C, **g), torch.randn(C, **g)
    fn, args = ops.add_layer_norm, (x, res, w, b, 1e-6, ls)
    bench_run(cuda_fn(fn, "add_layer_norm", *args), *args, bytes_moved=4 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C}, dtype=dt, impl="cuda")
