"""Projector GEMMs: Triton GEMM with bias(+exact GELU) epilogue vs cuBLAS, and the whole ``mlp1``.

Rows per GEMM shape: ``cublas`` (``F.linear`` + eager GELU: the GELU costs an extra read+write of the activation),
``triton`` (the fused-epilogue kernel, forced with ``INTERNVL_KERNELS_LINEAR=triton``) and ``auto`` (what
``ops.linear`` runs: it times both once per shape and keeps the faster — the chosen one is recorded in
``extra_info["linear_choice"]``). cuBLAS is used wherever it wins. Shapes: projector fc1 (13·256 tokens × 12800 →
6144, InternLM2-20B width), projector fc2 (6144 → 6144) and the InternViT-6B MLP fc1 (13·1025 × 3200 → 12800).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from _kernel_bench import C6B, I6B, LLM_HIDDEN, dtype_for, impl_label, pinned

from internvl_kernels import ops
from internvl_kernels.model import functional as F
from internvl_kernels.ops.linear import _m_bucket

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _gemm_shapes(full):
    if full:
        return {"projector_fc1": (13 * 256, 4 * C6B, LLM_HIDDEN, "gelu"),
                "projector_fc2": (13 * 256, LLM_HIDDEN, LLM_HIDDEN, "none"),
                "vit6b_fc1": (13 * 1025, C6B, I6B, "gelu")}
    return {"projector_fc1": (16, 512, 256, "gelu"), "projector_fc2": (16, 256, 256, "none"),
            "vit6b_fc1": (17, 128, 512, "gelu")}


def _cublas_linear(x, w, b, act):
    y = TF.linear(x, w, b)
    return F.gelu(y) if act == "gelu" else y


@pytest.mark.benchmark(group="linear_epilogue")
@pytest.mark.parametrize("impl", ["cublas", "triton", "auto"])
@pytest.mark.parametrize("case", ["projector_fc1", "projector_fc2", "vit6b_fc1"])
def test_linear(bench_run, benchmark, bench_device, full_shapes, monkeypatch, case, impl):
    M, K, N, act = _gemm_shapes(full_shapes)[case]
    dt = dtype_for(bench_device)
    g = dict(device=bench_device, dtype=dt)
    x, w, b = torch.randn(M, K, **g), torch.randn(N, K, **g) * K ** -0.5, torch.randn(N, **g)
    if impl == "cublas":
        fn = pinned(_cublas_linear, "eager")
    else:
        if impl == "triton":
            monkeypatch.setenv("INTERNVL_KERNELS_LINEAR", "triton")
        fn = pinned(ops.linear, "triton")
    bench_run(fn, x, w, b, act, flops=2 * M * N * K, shapes={"M": M, "K": K, "N": N, "act": act, "case": case},
              dtype=dt, impl=impl_label(impl if impl != "cublas" or bench_device.type == "cuda" else "torch-cpu",
                                        bench_device))
    if impl == "auto":
        key = (_m_bucket(M), N, K, str(dt).replace("torch.", ""), act)
        benchmark.extra_info["linear_choice"] = ops.linear_choices().get(key, "triton (no timing off-GPU)")


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
