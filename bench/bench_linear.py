"""linear: the Triton GEMM with a bias(+exact GELU) epilogue vs cuBLAS.

Rows per GEMM shape: ``cublas`` (``F.linear`` + eager GELU: the GELU costs an extra read+write of the activation),
``triton`` (the fused-epilogue kernel, forced with ``internvl_kernels.set_linear_impl("triton")``) and ``auto`` (what
``ops.linear`` runs: it times both once per shape and keeps the faster — the chosen one is recorded in
``extra_info["linear_choice"]``). cuBLAS is used wherever it wins. Shapes: projector fc1 (13·256 tokens × 12800 →
6144, InternLM2-20B width), projector fc2 (6144 → 6144) and the InternViT-6B MLP fc1 (13·1025 × 3200 → 12800).
There is no CUDA-extension ``linear`` (the cuBLAS row is the library baseline).
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as TF
from _kernel_bench import C6B, I6B, LLM_HIDDEN, dtype_for, impl_label, pinned

from internvl_kernels import ops
from internvl_kernels.model import functional as F
from internvl_kernels.ops._common import next_pow2
from internvl_kernels.options import set_linear_impl

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
def test_linear(bench_run, benchmark, bench_device, full_shapes, case, impl):
    M, K, N, act = _gemm_shapes(full_shapes)[case]
    dt = dtype_for(bench_device)
    g = dict(device=bench_device, dtype=dt)
    x, w, b = torch.randn(M, K, **g), torch.randn(N, K, **g) * K ** -0.5, torch.randn(N, **g)
    fn = pinned(_cublas_linear, "eager") if impl == "cublas" else pinned(ops.linear, "triton")
    with set_linear_impl("triton") if impl == "triton" else contextlib.nullcontext():
        bench_run(fn, x, w, b, act, flops=2 * M * N * K,
                  shapes={"M": M, "K": K, "N": N, "act": act, "case": case}, dtype=dt,
                  impl=impl_label(impl if impl != "cublas" or bench_device.type == "cuda" else "torch-cpu",
                                  bench_device))
    if impl == "auto":
        key = (next_pow2(M), N, K, str(dt).replace("torch.", ""), act)
        benchmark.extra_info["linear_choice"] = ops.linear_choices().get(key, "triton (no timing off-GPU)")
