"""int8 / fp8 W8A8 GEMM at the InternViT-6B shapes vs bf16 cuBLAS (GPU-only rows; target ≥ 1.7× bf16 cuBLAS).

M = 13 tiles × 1025 tokens = 13325; (K, N) = (3200, 9600) qkv, (3200, 3200) proj, (3200, 12800) fc1 (+ GELU),
(12800, 3200) fc2. Each W8A8 row runs one implementation (``triton`` fused epilogue, ``cublaslt`` = torch._int_mm /
torch._scaled_mm + epilogue) forced through ``INTERNVL_KERNELS_W8A8_GEMM``; the bf16 row is ``torch.addmm``.
A small CPU row (Triton interpreter) keeps the code path from rotting; its time is not a kernel speed.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import impl_label, pinned

from internvl_kernels import ops

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

M_VIT = 13 * 1025
VIT_SHAPES = [(3200, 9600, "none"), (3200, 3200, "none"), (3200, 12800, "gelu"), (12800, 3200, "none")]


def _operands(M, K, N, code_dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    if code_dtype == torch.int8:
        a = torch.randint(-127, 128, (M, K), generator=g, device=device, dtype=torch.int8)
        w = torch.randint(-127, 128, (N, K), generator=g, device=device, dtype=torch.int8)
    else:
        a = torch.randn(M, K, generator=g, device=device).mul(64).clamp(-448, 448).to(code_dtype)
        w = torch.randn(N, K, generator=g, device=device).mul(64).clamp(-448, 448).to(code_dtype)
    sa = torch.rand(M, generator=g, device=device) * 1e-3
    sw = torch.rand(N, generator=g, device=device) * 1e-3
    b = torch.randn(N, generator=g, device=device, dtype=torch.bfloat16)
    return a, sa, w, sw, b


@pytest.mark.gpu
@pytest.mark.benchmark(group="w8a8_gemm_vit6b")
@pytest.mark.parametrize("impl", ["bf16-cublas", "int8-triton", "int8-cublaslt", "fp8-triton", "fp8-cublaslt"])
@pytest.mark.parametrize("K,N,act", VIT_SHAPES, ids=lambda v: str(v))
def test_w8a8_gemm_vit6b(bench_run, bench_device, monkeypatch, K, N, act, impl):
    dev = bench_device
    M = M_VIT
    if impl == "bf16-cublas":
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)
        b = torch.randn(N, device=dev, dtype=torch.bfloat16)

        def fn():
            y = torch.addmm(b, x, w.t())
            return torch.nn.functional.gelu(y) if act == "gelu" else y
    else:
        codes, which = impl.split("-")
        cd = torch.int8 if codes == "int8" else torch.float8_e4m3fn
        if cd == torch.float8_e4m3fn and torch.cuda.get_device_capability(dev) < (8, 9):
            pytest.skip("fp8 tensor cores need sm_89+")
        monkeypatch.setenv("INTERNVL_KERNELS_W8A8_GEMM", which)
        a, sa, w, sw, b = _operands(M, K, N, cd, dev)
        fn = pinned(lambda: ops.int8_matmul(a, sa, w, sw, b, act, torch.bfloat16), "auto")
    bench_run(fn, flops=2 * M * K * N, shapes={"M": M, "K": K, "N": N, "activation": act}, dtype=torch.bfloat16,
              impl=impl, rounds=20)


@pytest.mark.benchmark(group="w8a8_gemm_small")
def test_w8a8_gemm_small(bench_run, bench_device):
    # the same op at a small shape on any device (CPU: Triton interpreter)
    a, sa, w, sw, b = _operands(97, 256, 128, torch.int8, bench_device)
    fn = pinned(lambda: ops.int8_matmul(a, sa, w, sw, b, "gelu", torch.bfloat16), "triton")
    bench_run(fn, flops=2 * 97 * 256 * 128, shapes={"M": 97, "K": 256, "N": 128}, dtype=torch.bfloat16,
              impl=impl_label("triton", bench_device), rounds=3)
