"""Quantizer throughput: one Linear per method (GPTQ / GPTQ+act-order / AWQ / RTN), InternViT-6B widths on a GPU.

GPU: qkv-shaped 3200→9600 and fc2-shaped 12800→3200 weights, 8 tiles × 1025 calibration tokens, fp16 weights.
CPU: reduced (576→1536, 2048 tokens, fp32). FLOPs counted for GPTQ: Hessian (2·N·in²) + Cholesky/inverse (~in³) +
the error-propagation updates (~2·out·in²); for RTN/AWQ only the bytes of the weight read and written.
Whole-model timing (45 InternViT-6B blocks, GPTQ W4 g128) lives in bench/gpu_quantize_vit6b.py.
"""
from __future__ import annotations

import pytest
import torch

import quantize


def _shapes(full):
    if full:
        return [("qkv_3200x9600", 9600, 3200), ("fc2_12800x3200", 3200, 12800)], 8 * 1025
    return [("mlp_576x1536", 1536, 576)], 2048


@pytest.mark.parametrize("method,act_order", [("gptq", False), ("gptq", True), ("awq", False), ("rtn", False)])
@pytest.mark.parametrize("which", [0, 1])
def test_quantize_linear(bench_run, bench_device, full_shapes, method, act_order, which):
    shapes, n_tok = _shapes(full_shapes)
    if which >= len(shapes):
        pytest.skip("only one reduced shape on CPU (full shapes need INTERNVL_BENCH_FULL=1 or a GPU)")
    name, out_f, in_f = shapes[which]
    dt = torch.float16 if bench_device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    W = (torch.randn(out_f, in_f, generator=g) * in_f ** -0.5).to(bench_device, dt)
    X = torch.randn(n_tok, in_f, generator=g).to(bench_device, dt)
    flops = None
    if method == "gptq":
        flops = 2 * n_tok * in_f ** 2 + in_f ** 3 + 2 * out_f * in_f ** 2
    bench_run(quantize.quantize_linear, W, X, method, bits=4, group_size=128, act_order=act_order,
              flops=flops, bytes_moved=2 * W.numel() * W.element_size(), shapes={"weight": [out_f, in_f],
              "calib_tokens": n_tok, "bits": 4, "group_size": 128, "shape": name},
              dtype=dt, impl=f"{method}{'+act-order' if act_order else ''}", rounds=3)
