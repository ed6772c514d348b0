"""The whole ``mlp1`` projector (LN → Linear → GELU → Linear) and the pixel-shuffle + project path.
The GEMM rows (Triton epilogue vs cuBLAS) are bench/bench_linear.py."""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, LLM_HIDDEN, cuda_fn, dtype_for, impl_label, pinned  # noqa: F401 (cuda_fn is a fixture)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _projector_args(bench_device, full_shapes):
    dt = dtype_for(bench_device)
    T, K, H = (13 * 256, 4 * C6B, LLM_HIDDEN) if full_shapes else (16, 512, 256)
    g = dict(device=bench_device, dtype=dt)
    args = (torch.randn(1, T, K, **g), torch.randn(K, **g), torch.randn(K, **g), torch.randn(H, K, **g) * K ** -0.5,
            torch.randn(H, **g), torch.randn(H, H, **g) * H ** -0.5, torch.randn(H, **g))
    return args, dt, T, K, H


@pytest.mark.benchmark(group="mlp_projector")
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_mlp_projector(bench_run, bench_device, full_shapes, impl):
    args, dt, T, K, H = _projector_args(bench_device, full_shapes)
    fn = pinned(F.mlp_projector if impl == "eager" else ops.mlp_projector, impl)
    bench_run(fn, *args, 1e-5, flops=2 * T * (K * H + H * H), shapes={"tokens": T, "in": K, "hidden": H}, dtype=dt,
              impl=impl_label(impl, bench_device))


@pytest.mark.benchmark(group="projector_path")
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_pixel_shuffle_and_project(bench_run, bench_device, full_shapes, impl):
    """What the patched model runs from the ViT tokens: shuffle+LN fused, then the epilogue GEMMs."""
    (_, lw, lb, w1, b1, w2, b2), dt, T, K, H = _projector_args(bench_device, full_shapes)
    tiles = T // 256 if full_shapes else 1
    side = 32 if full_shapes else 8
    C = K // 4
    vit = torch.randn(tiles, side * side, C, device=bench_device, dtype=dt)

    def eager(v):
        return F.mlp_projector(F.pixel_shuffle(v, 0.5, "v2"), lw, lb, w1, b1, w2, b2, 1e-5)

    def fused(v):
        return ops.projector_gemms(ops.pixel_shuffle_layer_norm(v, lw, lb, 0.5, "v2", 1e-5), w1, b1, w2, b2)

    t_out = tiles * side * side // 4
    bench_run(pinned(eager if impl == "eager" else fused, impl), vit, flops=2 * t_out * (K * H + H * H),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C, "llm_hidden": H}, dtype=dt,
              impl=impl_label(impl, bench_device))


# ------------------------------------------------------------------- cuda rows (csrc/ kernels via set_backend("cuda"))
@pytest.mark.gpu
@pytest.mark.benchmark(group="mlp_projector")
def test_mlp_projector_cuda(bench_run, bench_device, full_shapes, cuda_fn):
    dt = dtype_for(bench_device)
    T, K, H = (13 * 256, 4 * C6B, LLM_HIDDEN) if full_shapes else (16, 512, 256)
    g = dict(device=bench_device, dtype=dt)
    args = (torch.randn(1, T, K, **g), torch.randn(K, **g), torch.randn(K, **g), torch.randn(H, K, **g) * K ** -0.5,
            torch.randn(H, **g), torch.randn(H, H, **g) * H ** -0.5, torch.randn(H, **g))
    fn = cuda_fn(ops.mlp_projector, "mlp_projector", *args, 1e-5)
    bench_run(fn, *args, 1e-5, flops=2 * T * (K * H + H * H), shapes={"tokens": T, "in": K, "hidden": H}, dtype=dt,
              impl="cuda")

