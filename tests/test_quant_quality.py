"""Quality on real weights / real data.

Regular (fast): one real SmolLM2-135M Linear with real calibration activations (GPTQ clearly below RTN on held-out
activations); InternViT (random init, real 6B block structure, real photos through the tiler): feature SQNR at W4
g128 per method, W8 >= 35 dB.
Slow (``-m slow``; CI should not run them by default): the perplexity bars (GPTQ and AWQ close >= half of RTN's gap at
W4 and W3) and the full CPU demo.
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


def _ppl_rows(names):
    import argparse
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts"))
    from quality_smollm2 import CONFIGS, run_one

    # scripts/quality_smollm2.py protocol, reduced: 16 calibration windows, 8 held-out windows of 512 tokens
    args = argparse.Namespace(group_size=64, seed=0, quiet=True, awq_search_tokens=4096, nsamples=16, seqlen=512,
                              eval_windows=8)
    return {n: run_one(n, CONFIGS[n], args) for n in names}


def _closes_half(rows, method, bits):
    f = rows[f"rtn{bits}"]["ppl_float"]
    gap = rows[f"rtn{bits}"]["ppl"] - f
    assert gap > 0
    return rows[f"{method}{bits}"]["ppl"] <= f + 0.5 * gap


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
@pytest.mark.xfail(strict=True, reason="known: plain GPTQ (no act-order, min/max ranges, unweighted Hessian) only "
                   "matches RTN's perplexity on SmolLM2-135M (W4 17.09 vs 17.08) although it lowers every layer's "
                   "output error; see quantize/README.md. Remove the xfail if it ever passes.")
def test_perplexity_bars_smollm2_plain_gptq():
    rows = _ppl_rows(["rtn4", "gptq4"])
    assert _closes_half(rows, "gptq", 4), rows


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
