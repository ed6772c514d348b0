"""pixel_shuffle and pixel_shuffle_layer_norm (Triton gathers) vs the eager reshape/permute/contiguous code.

Input: InternViT-6B tokens without cls ``[tiles, 1024, 3200]``. GB/s counts one read of the tokens and one write of
the output; target on an H100 ≥ 90% of the measured copy bandwidth. The eager LN row is ``layer_norm(pixel_shuffle(x))``
(shuffled copy + LN), the fused row never writes the shuffled tensor.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, cuda_fn, dtype_for, impl_label, pinned  # noqa: F401 (cuda_fn is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _tokens(bench_device, full_shapes):
    dt = dtype_for(bench_device)
    tiles, side = (13, 32) if full_shapes else (1, 8)
    return torch.randn(tiles, side * side, C6B, device=bench_device, dtype=dt), dt, tiles, side


@pytest.mark.benchmark(group="pixel_shuffle")
@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle(bench_run, bench_device, full_shapes, version, impl):
    x, dt, tiles, side = _tokens(bench_device, full_shapes)
    fn = pinned(F.pixel_shuffle if impl == "eager" else ops.pixel_shuffle, impl)
    bench_run(fn, x, 0.5, version, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C6B, "version": version}, dtype=dt,
              impl=impl_label(impl, bench_device))


@pytest.mark.benchmark(group="pixel_shuffle_layer_norm")
@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_layer_norm(bench_run, bench_device, full_shapes, version, impl):
    x, dt, tiles, side = _tokens(bench_device, full_shapes)
    w = torch.randn(4 * C6B, device=bench_device, dtype=dt)
    b = torch.randn(4 * C6B, device=bench_device, dtype=dt)
    fn = pinned(F.pixel_shuffle_layer_norm if impl == "eager" else ops.pixel_shuffle_layer_norm, impl)
    bench_run(fn, x, w, b, 0.5, version, 1e-5, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C6B, "version": version}, dtype=dt,
              impl=impl_label(impl, bench_device))


# ------------------------------------------------------------------- cuda rows (csrc/ kernels via set_backend("cuda"))
def _grid(bench_device, full_shapes):
    dt = dtype_for(bench_device)
    tiles, side = (13, 32) if full_shapes else (1, 8)
    return torch.randn(tiles, side * side, C6B, device=bench_device, dtype=dt), dt, tiles, side


@pytest.mark.gpu
@pytest.mark.benchmark(group="pixel_shuffle")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_cuda(bench_run, bench_device, full_shapes, cuda_fn, version):
    x, dt, tiles, side = _grid(bench_device, full_shapes)
    fn = cuda_fn(ops.pixel_shuffle, "pixel_shuffle", x, 0.5, version)
    bench_run(fn, x, 0.5, version, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C6B, "version": version}, dtype=dt,
              impl="cuda")

@pytest.mark.gpu
@pytest.mark.benchmark(group="pixel_shuffle_layer_norm")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_layer_norm_cuda(bench_run, bench_device, full_shapes, cuda_fn, version):
    x, dt, tiles, side = _grid(bench_device, full_shapes)
    w = torch.randn(4 * C6B, device=bench_device, dtype=dt)
    b = torch.randn(4 * C6B, device=bench_device, dtype=dt)
    fn = cuda_fn(ops.pixel_shuffle_layer_norm, "pixel_shuffle_layer_norm", x, w, b, 0.5, version, 1e-5)
    bench_run(fn, x, w, b, 0.5, version, 1e-5, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C6B, "version": version}, dtype=dt,
              impl="cuda")
