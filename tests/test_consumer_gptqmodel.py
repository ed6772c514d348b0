"""A real consumer: GPTQModel 7.7 on CPU (its torch kernel) loads GPTQ folders written by ``python -m quantize`` from
the real SmolLM2-135M, and a folder GPTQModel wrote loads in this project's runtime — with the same logits.

Runs only where gptqmodel imports (its own venv: ``.ci/gptqmodel.sh``); skipped with the reason elsewhere.

GPTQModel's TorchLinear runs float16/bfloat16 only. The 1e-3 logit bar is checked on GPTQModel's own decode of the
folder (``TorchLinear.dequantize_weight()`` of the loaded model, run in fp32) against this project's runtime in fp32,
so it tests how each side reads the format; GPTQModel's own fp16 forward is compared too, with the fp16 bar.
"""
import os

import pytest
import torch

# GPTQModel's torch kernel wraps parts in torch.compile; on CPU with many layer shapes that hits dynamo's recompile
# limit and only costs time: run it eagerly (same arithmetic).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
gptqmodel = pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (optional consumer check: "
                                "bash .ci/gptqmodel.sh builds its venv and runs this file)")

from internvl_kernels.model import load_quantized_llm  # noqa: E402
from internvl_kernels.quant.checker import check_folder  # noqa: E402
from quantize.cli import main  # noqa: E402

REL_FORMAT = 1e-3   # GPTQModel's decode (fp32) vs this runtime (fp32)
REL_FP16 = 1e-2     # GPTQModel's own fp16 kernel forward vs this runtime (fp32); measured ≈ 2e-3


def _rel(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from quantize.demo import load_smollm2

    model, tok = load_smollm2()
    d = str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _inputs(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    text = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
            "Photosynthesis converts light energy into chemical energy in plants."]
    enc = tok(text, return_tensors="pt", padding=True)
    return enc["input_ids"][:, :16]


def _gptqmodel_load(folder):
    from gptqmodel import BACKEND, GPTQModel

    return GPTQModel.load(folder, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)


def _decoded(m):
    """GPTQModel's own decode of one TorchLinear (its unpacking, zero handling and g_idx) as nn.Linear's [out, in].

    Its ``dequantize_weight`` multiplies in the scales' dtype (fp16, which alone moves the logits by ~1e-3 over 30
    layers), so the scales are upcast to fp32 for the call and put back after it.
    """
    s = m.scales.data
    m.scales.data = s.float()
    try:
        w = m.dequantize_weight()
    finally:
        m.scales.data = s
    assert w.dtype == torch.float32 and w.shape == (m.in_features, m.out_features), (w.dtype, tuple(w.shape))
    return w.t().contiguous()


def _gptqmodel_decoded_dense(gm, folder):
    """A float32 LlamaForCausalLM holding GPTQModel's own dequantized weights (its TorchLinear.dequantize_weight)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    cfg.quantization_config = None
    dense = LlamaForCausalLM(cfg).float().eval()
    qmods = {n: m for n, m in gm.model.named_modules() if isinstance(m, BaseQuantLinear)}
    assert len(qmods) == 7 * cfg.num_hidden_layers
    sd = {}
    for n, t in gm.model.state_dict().items():
        mod = n.rsplit(".", 1)[0]
        if mod not in qmods:
            sd[n] = t.float()
    for n, m in qmods.items():
        sd[n + ".weight"] = _decoded(m)
        if getattr(m, "bias", None) is not None:
            sd[n + ".bias"] = m.bias.float()
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    dense.tie_weights()
    return dense, qmods


def _ours(folder):
    return load_quantized_llm(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptqmodel_loads_our_folder(smollm2, tmp_path, capsys, fmt, sym):
    out = str(tmp_path / f"smollm2-{fmt}-{'sym' if sym else 'asym'}")
    args = ["--model", smollm2, "--out", out, "--method", "rtn", "--bits", "4", "--group-size", "64",
            "--format", fmt, "--sym" if sym else "--asym", "--target", "any", "--nsamples", "4", "--seqlen", "64",
            "--eval-windows", "0", "--no-progress", "--device", "cpu"]
    assert main(args) == 0, capsys.readouterr().err
    rep = check_folder(out)
    assert rep["verdicts"]["internvl-kernels"]["verdict"] == "loads"
    x = _inputs(out)
    if fmt == "gptq" and not sym:
        # GPTQModel refuses asymmetric v1 folders it did not write itself; the checker says so
        assert rep["verdicts"]["gptqmodel"]["verdict"] == "refuses"
        assert "gm.asym_v1" in {r["rule"] for r in rep["verdicts"]["gptqmodel"]["reasons"]}
        with pytest.raises(ValueError, match="sym=False model with format=FORMAT.GPTQ"):
            _gptqmodel_load(out)
        return
    assert rep["verdicts"]["gptqmodel"]["verdict"] == "loads"
    gm = _gptqmodel_load(out)
    with torch.no_grad():
        l_gm = gm.model(input_ids=x).logits.float()  # GPTQModel's own fp16 kernel forward (before decoding)
    dense, qmods = _gptqmodel_decoded_dense(gm, out)
    ours = _ours(out)
    # the decoded weights agree (GPTQModel's vs ours), layer by layer
    for n, m in list(qmods.items())[:14]:  # the decoded weights agree, layer by layer
        torch.testing.assert_close(_decoded(m), ours.get_submodule(n).dequantize_weight().float(),
                                   rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        l_ours = ours(input_ids=x).logits
        l_fmt = dense(input_ids=x).logits
    assert _rel(l_fmt, l_ours) <= REL_FORMAT
    assert _rel(l_gm, l_ours) <= REL_FP16


def test_our_runtime_loads_a_gptqmodel_folder(smollm2, tmp_path):
    """GPTQModel quantizes (CPU, W4 g64 sym, tiny calibration) and saves; this runtime loads that folder."""
    from gptqmodel import GPTQModel, QuantizeConfig

    src = str(tmp_path / "src")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the real SmolLM2-135M cut to its first 6 decoder layers (keeps the step within CI's time; a format test)
    m = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    m.model.layers = m.model.layers[:6]
    m.config.num_hidden_layers = 6
    m.save_pretrained(src)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(src)
    qc = QuantizeConfig(bits=4, group_size=64, sym=True, desc_act=False, offload_to_disk=False)
    gm = GPTQModel.load(src, qc, device="cpu")
    calib = ["The quick brown fox jumps over the lazy dog. " * 6, "Paris is the capital of France. " * 8]
    gm.quantize(calib, batch_size=1)
    out = str(tmp_path / "gptqmodel-w4g64")
    gm.save(out)
    del gm
    rep = check_folder(out)
    lay = rep["layout"]
    assert lay["method"] == "gptq" and lay["bits"] == 4 and lay["group_size"] == 64 and lay["sym"] is True
    assert lay["n_quantized"] == 7 * 6
    assert rep["verdicts"]["internvl-kernels"]["verdict"] == "loads"
    assert rep["verdicts"]["gptqmodel"]["verdict"] == "loads"
    x = _inputs(out)
    g2 = _gptqmodel_load(out)
    with torch.no_grad():
        l_gm = g2.model(input_ids=x).logits.float()
    dense, _ = _gptqmodel_decoded_dense(g2, out)
    ours = _ours(out)
    with torch.no_grad():
        l_ours = ours(input_ids=x).logits
        l_fmt = dense(input_ids=x).logits
    assert _rel(l_fmt, l_ours) <= REL_FORMAT
    assert _rel(l_gm, l_ours) <= REL_FP16
    assert os.path.isfile(os.path.join(out, "quantize_config.json"))
