"""CUDA-backend rows (csrc/ kernels through ``set_backend("cuda")``) beside the eager / Triton / SDPA rows of the
per-op benchmark files: same groups, same shapes, same byte / FLOP accounting, so ``pytest bench/ --benchmark-only``
prints them side by side (quant_matmul's cuda rows live in bench_quant_matmul.py).

GPU-only (the CUDA kernels need a CUDA device); each row skips with the loader's reason when the extension is not
built (``pip install --no-build-isolation -e .``). Every row first checks that the CUDA kernel really runs for its
inputs (the ``cuda:<op>`` launch counter), so a fallback to Triton can't be reported as a CUDA number.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, C300M, D6B, D300M, H6B, H300M, I6B, LLM_HIDDEN, dtype_for, pinned, tiles_tokens

from internvl_kernels import ops
from internvl_kernels.ops import _common

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_fn():
    from internvl_kernels.ops import _cuda

    if not _cuda.available():
        pytest.skip(_cuda.status())

    def make(fn, op, *args):
        run = pinned(fn, "cuda")
        before = _common.launches("cuda:" + op)
        run(*args)
        if _common.launches("cuda:" + op) == before:
            pytest.fail(f"{op}: the CUDA kernel did not run for these inputs (routed elsewhere)")
        return run

    return make


# ---------------------------------------------------------------------------------------------------- norms
RMS_CASES = {"vit6b_norm": C6B, "vit6b_mlp_width": I6B, "llm_norm": LLM_HIDDEN}


@pytest.mark.benchmark(group="rms_norm")
@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm_cuda(bench_run, bench_device, full_shapes, cuda_fn, case):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = RMS_CASES[case]
    x = torch.randn(tiles, seq, C, device=bench_device, dtype=dt)
    w = torch.randn(C, device=bench_device, dtype=dt)
    fn = cuda_fn(ops.rms_norm, "rms_norm", x, w, 1e-6)
    bench_run(fn, x, w, 1e-6, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "case": case}, dtype=dt, impl="cuda")


LN_CASES = {"vit300m_norm": C300M, "projector_ln": 4 * C6B}


@pytest.mark.benchmark(group="layer_norm")
@pytest.mark.parametrize("case", list(LN_CASES))
def test_layer_norm_cuda(bench_run, bench_device, full_shapes, cuda_fn, case):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = LN_CASES[case]
    g = dict(device=bench_device, dtype=dt)
    x, w, b = torch.randn(tiles, seq, C, **g), torch.randn(C, **g), torch.randn(C, **g)
    fn = cuda_fn(ops.layer_norm, "layer_norm", x, w, b, 1e-6)
    bench_run(fn, x, w, b, 1e-6, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "case": case}, dtype=dt, impl="cuda")


@pytest.mark.benchmark(group="add_norm")
@pytest.mark.parametrize("op", ["add_rms_norm", "add_layer_norm"])
def test_add_norm_cuda(bench_run, bench_device, full_shapes, cuda_fn, op):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    C = C6B if op == "add_rms_norm" else C300M
    g = dict(device=bench_device, dtype=dt)
    x, res = torch.randn(tiles, seq, C, **g), torch.randn(tiles, seq, C, **g)
    w, b, ls = torch.randn(C, **g), torch.randn(C, **g), torch.randn(C, **g)
    if op == "add_rms_norm":
        fn, args = ops.add_rms_norm, (x, res, w, 1e-6, ls)
    else:
        fn, args = ops.add_layer_norm, (x, res, w, b, 1e-6, ls)
    bench_run(cuda_fn(fn, op, *args), *args, bytes_moved=4 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "seq": seq, "hidden": C}, dtype=dt, impl="cuda")


# ------------------------------------------------------------------------------------------- pixel shuffle
def _grid(bench_device, full_shapes):
    dt = dtype_for(bench_device)
    tiles, side = (13, 32) if full_shapes else (1, 8)
    return torch.randn(tiles, side * side, C6B, device=bench_device, dtype=dt), dt, tiles, side


@pytest.mark.benchmark(group="pixel_shuffle")
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_cuda(bench_run, bench_device, full_shapes, cuda_fn, version):
    x, dt, tiles, side = _grid(bench_device, full_shapes)
    fn = cuda_fn(ops.pixel_shuffle, "pixel_shuffle", x, 0.5, version)
    bench_run(fn, x, 0.5, version, bytes_moved=2 * x.numel() * x.element_size(),
              shapes={"tiles": tiles, "tokens": side * side, "hidden": C6B, "version": version}, dtype=dt,
              impl="cuda")


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


# ---------------------------------------------------------------------------------------------- attention
ATT_SHAPES = {"vit6b_heads": (H6B, D6B), "vit300m_heads": (H300M, D300M)}


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("shape", list(ATT_SHAPES))
def test_attention_cuda(bench_run, bench_device, full_shapes, cuda_fn, shape):
    H, D = ATT_SHAPES[shape]
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    qkv = torch.randn(tiles, seq, 3 * H * D, device=bench_device, dtype=dt)
    q, k, v = qkv.reshape(tiles, seq, 3, H, D).unbind(2)  # strided views, as the other rows get them
    scale = D ** -0.5

    def att(q, k, v, s):
        return ops.attention(q, k, v, s).reshape(tiles, seq, H * D)

    fn = cuda_fn(att, "attention", q, k, v, scale)
    bench_run(fn, q, k, v, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "heads": H, "head_dim": D}, dtype=dt, impl="cuda")


@pytest.mark.benchmark(group="qk_norm_attention")
def test_qk_norm_attention_cuda(bench_run, bench_device, full_shapes, cuda_fn):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    H, D = H6B, D6B
    C = H * D
    g = dict(device=bench_device, dtype=dt)
    qkv, wq, wk = torch.randn(tiles, seq, 3 * C, **g), torch.randn(C, **g), torch.randn(C, **g)
    scale = D ** -0.5
    fn = cuda_fn(ops.qk_norm_attention, "qk_norm_attention", qkv, wq, wk, H, 1e-6, scale)
    bench_run(fn, qkv, wq, wk, H, 1e-6, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "heads": H, "head_dim": D, "vit6b_hidden": C6B},
              dtype=dt, impl="cuda")


# ---------------------------------------------------------------------------------------------- projector
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
