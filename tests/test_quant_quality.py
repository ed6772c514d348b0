"""Quality on real weights / real data.

Regular (fast): one real SmolLM2-135M Linear with real calibration activations (GPTQ clearly below RTN on held-out
activations); InternViT (random init, real 6B block structure, real photos through the tiler): feature SQNR at W4
g128 per method, W8 >= 35 dB; the attention-sink error of plain vs sink-weighted GPTQ on a real v_proj; RTN decodes
within half a step in every storage format.
Slow (``-m slow``; CI should not run them by default): the perplexity bars on the test part of the held-out split
(plain GPTQ >= 25 % and the CLI defaults >= half of RTN's gap at W4 on the documented 128 x 512 protocol; AWQ and the
act-order/MSE/sink GPTQ flags at W4 and W3 on a reduced one) and the full CPU demo.
"""
import json
import os

import pytest
import torch

import quantize

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def smollm2():
    from quantize.demo import load_smollm2

    return load_smollm2(torch.float32)


def _linear_inputs(model, name, ids):
    """Real inputs of ``name`` for the token windows ``ids`` (the forward stops once they are captured)."""
    caught = []

    class Stop(Exception):
        pass

    def hook(mod, args):
        caught.append(args[0].reshape(-1, args[0].shape[-1]).detach())
        raise Stop

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            try:
                model.model(ids)
            except Stop:
                pass
    finally:
        h.remove()
    return caught[0]


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_a_real_smollm2_linear(smollm2, bits):
    from quantize.calib import calibration_windows, heldout_windows

    model, tok = smollm2
    name = "model.layers.5.self_attn.q_proj"  # 576 → 576, group 64
    x_cal = _linear_inputs(model, name, calibration_windows(tok, 8, 256, seed=0))  # 2048 real tokens
    x_eval = _linear_inputs(model, name, heldout_windows(tok, 2, 256))  # held-out text
    W = model.get_submodule(name).weight.data
    y = x_eval @ W.t()

    def err(method, **kw):
        r = quantize.quantize_linear(W, x_cal, method, bits=bits, group_size=64, **kw)
        return float((x_eval @ r.dequantized.t() - y).norm() / y.norm())

    e_rtn, e_gptq, e_ao = err("rtn"), err("gptq"), err("gptq", act_order=True)
    print(f"W{bits} g64 {name}: output rel. error RTN {e_rtn:.4f}  GPTQ {e_gptq:.4f}  GPTQ+act-order {e_ao:.4f}")
    assert e_gptq < 0.9 * e_rtn and e_ao < 0.9 * e_rtn


def _vit_model(seed=0, layers=3):
    from internvl_kernels.model import InternVisionConfig, InternVisionModel
    from internvl_kernels.model.testing import randomize_
    from quantize.runner import LoadedModel

    cfg = InternVisionConfig(image_size=448, patch_size=14, hidden_size=256, num_attention_heads=2,
                             intermediate_size=1024, num_hidden_layers=layers, qkv_bias=False, qk_normalization=True,
                             norm_type="rms_norm", layer_norm_eps=1e-6, initializer_factor=0.1)
    model = InternVisionModel(cfg)
    randomize_(model, seed)
    return LoadedModel("intern_vit", model.eval(), cfg.to_dict(), None, None, "random InternViT (6B structure)")


def test_internvit_feature_sqnr(tmp_path):
    from quantize.engine import QuantSettings
    from quantize.runner import RunConfig, run

    results = {}
    for method, bits in [("rtn", 4), ("gptq", 4), ("awq", 4), ("gptq", 8)]:
        st = QuantSettings(method=method, bits=bits, group_size=128, fmt="gptq_v2", progress=False)
        rc = RunConfig(settings=st, parts=("vision",), max_calib_images=3, max_tiles=1, eval_images=2,
                       batch_size=2, write=False)
        rep = run(rc, _vit_model(layers=2))
        results[f"{method}-W{bits}"] = rep["metrics"]["vit_feature_sqnr_db"]
    print("InternViT (random init, 6B block structure, 256 wide, 2 blocks, 448 px photos) feature SQNR, g128:",
          json.dumps({k: round(v, 2) for k, v in results.items()}))
    assert results["gptq-W8"] >= 35.0
    for k in ("rtn-W4", "gptq-W4", "awq-W4"):
        assert 15.0 < results[k] < results["gptq-W8"]
    assert results["gptq-W4"] > results["rtn-W4"]


def _ppl_rows(names, protocol="reduced"):
    import argparse
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    from quality_smollm2 import CONFIGS, run_one

    from quantize.calib import TEST_OFFSET

    # scripts/quality_smollm2.py protocol on the test part of the held-out split (never used to choose an option):
    # "table" = the documented one (128 calibration windows x 512 tokens, 40 test windows), "reduced" = 16
    # calibration windows, 8 test windows
    size = dict(nsamples=128, eval_windows=40) if protocol == "table" else dict(nsamples=16, eval_windows=8)
    args = argparse.Namespace(group_size=64, seed=0, quiet=True, awq_search_tokens=4096, seqlen=512,
                              eval_offset=TEST_OFFSET, **size)
    return {n: run_one(n, CONFIGS[n], args) for n in names}


def _closes_half(rows, method, bits, share=0.5):
    f = rows[f"rtn{bits}"]["ppl_float"]
    gap = rows[f"rtn{bits}"]["ppl"] - f
    assert gap > 0
    return rows[f"{method}{bits}"]["ppl"] <= f + (1 - share) * gap


@pytest.mark.slow
def test_perplexity_bars_smollm2_awq():
    """AWQ closes at least half of RTN's perplexity gap at W4 and W3 (~25 min on 2 CPU cores)."""
    rows = _ppl_rows(["rtn4", "awq4", "rtn3", "awq3"])
    assert _closes_half(rows, "awq", 4) and _closes_half(rows, "awq", 3), rows


@pytest.mark.slow
def test_perplexity_bars_smollm2_gptq():
    """GPTQ with act-order, MSE range search and sink weighting (--act-order --mse --sink-weight 512) closes at least
    half of RTN's perplexity gap at W4 and W3 (~15 min on 2 CPU cores)."""
    rows = _ppl_rows(["rtn4", "gptq4aomsesink", "rtn3", "gptq3aomsesink"])
    rows["gptq4"], rows["gptq3"] = rows["gptq4aomsesink"], rows["gptq3aomsesink"]
    assert _closes_half(rows, "gptq", 4) and _closes_half(rows, "gptq", 3), rows


@pytest.mark.slow
def test_perplexity_bars_smollm2_cli_defaults():
    """GPTQ with the CLI defaults (group-aware order, damp 0.1, sink weight 512 — chosen on dev windows 0-23) closes
    at least half of RTN's perplexity gap at W4 g64 on the test part of the held-out split (windows 100-139, never
    used to choose them), documented protocol (128 x 512 calibration; ~10 min on 2 CPU cores)."""
    rows = _ppl_rows(["rtn4", "gptq4cli"], protocol="table")
    f, rtn = rows["rtn4"]["ppl_float"], rows["rtn4"]["ppl"]
    assert rtn > f and rows["gptq4cli"]["ppl"] <= f + 0.5 * (rtn - f), rows


@pytest.mark.slow
def test_perplexity_bars_smollm2_plain_gptq():
    """Plain GPTQ (the default flags with token-uniform Hessians, --sink-weight 1) closes at least 25 % of RTN's
    perplexity gap at W4 g64 on the test windows, documented protocol (128 x 512 calibration; ~10 min)."""
    rows = _ppl_rows(["rtn4", "gptq4"], protocol="table")
    assert _closes_half(rows, "gptq", 4, share=0.25), rows


@pytest.mark.slow
def test_full_demo_default_command(tmp_path):
    """``python -m quantize --bits 4`` exactly as README's main job runs it (a few minutes on 2 CPU cores)."""
    import subprocess
    import sys

    out = tmp_path / "quantized-demo"
    r = subprocess.run([sys.executable, "-m", "quantize", "--bits", "4", "--no-progress"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DEMO" in r.stdout and (out / "quant_report.json").is_file()
    rep = json.loads((out / "quant_report.json").read_text())
    m = rep["metrics"]
    assert m["vit_feature_sqnr_db"] > 25 and m["llm_ppl_quant"] < 2 * m["llm_ppl_float"]


def _block_inputs(model, layer, name, ids):
    """``[windows, S, C]`` inputs of ``model.layers[layer].<name>`` for the token windows ``ids`` (float model)."""
    caught = []

    class Stop(Exception):
        pass

    def hook(mod, args):
        caught.append(args[0].detach())
        raise Stop

    h = model.model.layers[layer].get_submodule(name).register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            for b in torch.split(ids, 4):
                try:
                    model.model(input_ids=b)
                except Stop:
                    pass
    finally:
        h.remove()
    return torch.cat(caught)


def test_gptq_attention_sink_error_on_real_smollm2_layer(smollm2):
    """Pins why plain GPTQ does not lower SmolLM2's perplexity: on a real v_proj (layer 12) it lowers the held-out
    output error of ordinary tokens far below RTN's but raises the error of each window's first token — the attention
    sink, whose value every later query reads — above the signal itself, because the sink's input lies in a direction
    the token-uniform Hessian gives almost no weight. Weighting the first token in the k/v Hessians (``sink_weight``,
    the CLI default 512) brings the sink's error back below RTN's while keeping most of the gain on the other tokens."""
    from quantize.calib import calibration_windows, heldout_windows
    from quantize.gptq import Hessian, gptq_quantize
    from quantize.rtn import rtn_quantize

    model, tok = smollm2
    layer, name = 12, "self_attn.v_proj"
    x_cal = _block_inputs(model, layer, name, calibration_windows(tok, 16, 256, seed=0))
    x_ev = _block_inputs(model, layer, name, heldout_windows(tok, 4, 256, offset=100))  # the test part
    W = model.model.layers[layer].get_submodule(name).weight.data
    y = x_ev @ W.t()

    def errs(r):
        e = x_ev @ r.dequantized.t() - y
        return float(e[:, 0].norm() / y[:, 0].norm()), float(e[:, 1:].norm() / y[:, 1:].norm())

    def hessian(sink_weight):
        H = Hessian(W.shape[1])
        x = x_cal.clone()
        x[:, 0] *= sink_weight ** 0.5
        H.add(x)
        return H.H

    first_rtn, rest_rtn = errs(rtn_quantize(W, 4, 64))
    first_plain, rest_plain = errs(gptq_quantize(W, hessian(1.0), 4, 64))
    first_sink, rest_sink = errs(gptq_quantize(W, hessian(512.0), 4, 64))
    print(f"layer {layer} {name} W4 g64 held-out output rel. error (first token / rest): RTN {first_rtn:.3f} / "
          f"{rest_rtn:.3f}, GPTQ {first_plain:.3f} / {rest_plain:.3f}, GPTQ sink 512 {first_sink:.3f} / {rest_sink:.3f}")
    assert rest_plain < 0.6 * rest_rtn  # GPTQ works for ordinary tokens ...
    assert first_plain > 2 * first_rtn  # ... and breaks the sink
    assert first_sink < first_rtn and rest_sink < 0.8 * rest_rtn


@pytest.mark.parametrize("layer,name", [(5, "self_attn.q_proj"), (12, "self_attn.k_proj"), (12, "self_attn.v_proj"),
                                        (20, "mlp.down_proj")])
def test_gptq_defaults_vs_reference_order_on_real_smollm2_layers(smollm2, layer, name):
    """What the default GPTQ changes against the reference algorithm (natural column order, damp 0.01), pinned on
    real SmolLM2 layers with held-out activations: group-aware reordering (GAR) with damp 0.1 lowers the output error
    of ordinary tokens on every layer, and of the attention sink (each window's first token) on k/v — the error the
    natural order inflates most (test_gptq_attention_sink_error_on_real_smollm2_layer) — while GPTQ stays far below
    RTN for ordinary tokens. End to end this is what moves plain GPTQ from ~1 % to > 25 % of RTN's perplexity gap
    (quantize/README.md, slow test below)."""
    from quantize.calib import calibration_windows, heldout_windows
    from quantize.gptq import Hessian, gptq_quantize
    from quantize.rtn import rtn_quantize

    model, tok = smollm2
    x_cal = _block_inputs(model, layer, name, calibration_windows(tok, 16, 256, seed=0))
    x_ev = _block_inputs(model, layer, name, heldout_windows(tok, 4, 256, offset=0))
    W = model.model.layers[layer].get_submodule(name).weight.data
    y = x_ev @ W.t()
    H = Hessian(W.shape[1])
    H.add(x_cal)

    def errs(r):
        e = x_ev @ r.dequantized.t() - y
        return float(e[:, 0].norm() / y[:, 0].norm()), float(e[:, 1:].norm() / y[:, 1:].norm())

    first_rtn, rest_rtn = errs(rtn_quantize(W, 4, 64))
    first_ref, rest_ref = errs(gptq_quantize(W, H.H, 4, 64, damp=0.01, group_order=False))
    first_def, rest_def = errs(gptq_quantize(W, H.H, 4, 64, damp=0.1, group_order=True))
    print(f"layer {layer} {name} W4 g64 held-out output rel. error (first token / rest): RTN {first_rtn:.3f} / "
          f"{rest_rtn:.4f}, reference GPTQ {first_ref:.3f} / {rest_ref:.4f}, default GPTQ {first_def:.3f} / "
          f"{rest_def:.4f}")
    assert rest_def < 0.98 * rest_ref and rest_def < 0.9 * rest_rtn
    if name in ("self_attn.k_proj", "self_attn.v_proj"):
        assert first_def < 0.92 * first_ref


def test_gptq_defaults_beat_rtn_end_to_end_small(smollm2):
    """A small end-to-end check on the real model (every decoder Linear of SmolLM2-135M, W4 g64 asymmetric, 16
    calibration windows x 256 tokens, 6 held-out test windows x 256): plain GPTQ with the default flags (group-aware
    order, damp 0.1, token-uniform Hessians) and the CLI defaults (sink weight 512) both end below RTN's perplexity,
    the CLI defaults by a clear margin. The documented-protocol bars are the slow tests above."""
    import copy

    from quantize.calib import TEST_OFFSET
    from quantize.engine import QuantSettings
    from quantize.runner import LoadedModel, RunConfig, run

    model, tok = smollm2
    ppl = {}
    for name, kw in (("rtn", dict(method="rtn")), ("plain", dict(method="gptq", sink_weight=1.0)),
                     ("cli", dict(method="gptq", sink_weight=512.0))):
        lm = LoadedModel("llm", copy.deepcopy(model), {}, tok, None, "SmolLM2-135M-Instruct")
        st = QuantSettings(bits=4, group_size=64, fmt="gptq_v2", progress=False, **kw)
        rc = RunConfig(settings=st, parts=("llm",), nsamples=16, seqlen=256, eval_windows=6, eval_offset=TEST_OFFSET,
                       batch_size=4, write=False, mm_samples=0)
        m = run(rc, lm, log=lambda *a: None)["metrics"]
        ppl[name], ppl["float"] = m["llm_ppl_quant"], m["llm_ppl_float"]
    print("SmolLM2-135M W4 g64, 16x256 calibration, 6x256 test windows, perplexity:",
          {k: round(v, 3) for k, v in ppl.items()})
    gap = ppl["rtn"] - ppl["float"]
    assert gap > 0
    assert ppl["plain"] < ppl["rtn"] - 0.1 * gap
    assert ppl["cli"] < ppl["rtn"] - 0.4 * gap


def test_rtn_decodes_within_half_a_step_in_every_format():
    """Codes are rounded against the stored (fp16) scale and zero: the packed tensors of every format decode to within
    half a step of the original weight, plus the fp16 rounding of the decoded value itself."""
    from quantize import formats
    from quantize.rtn import rtn_quantize

    g = torch.Generator().manual_seed(7)
    W = torch.randn(96, 320, generator=g) * torch.logspace(-3, 0, 320)[None, :]  # wide range of group scales
    W[3] = W[3].abs() + 0.5  # a row with no negative weight (zero point 0 in gptq_v2/awq, widened grid in v1)
    for fmt, min_zero in (("gptq", 1), ("gptq_v2", 0), ("awq", 0)):
        for bits in ((4,) if fmt == "awq" else (4, 3, 8)):
            r = rtn_quantize(W, bits, 64, sym=False, min_zero=min_zero)
            t = r.pack(fmt)
            deq = formats.dequantize(t, fmt, bits, 64, torch.float32)
            step = r.scales[r.g_idx.long()].t()
            fp16_ulp = deq.abs().to(torch.float16).float() * 2 ** -10
            over = (W - deq).abs() - (0.5 * step + fp16_ulp)
            assert torch.isfinite(deq).all()
            assert float(over.max()) <= 1e-7, (fmt, bits, float(over.max()))
