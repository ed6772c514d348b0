"""AutoAWQ 0.2.9's CPU-usable pieces against AWQ folders of the real SmolLM2-135M, both directions.

AutoAWQ's model code does not import under transformers 5, but its GEMM packing (``WQLinear_GEMM.from_linear``) and
its decoder (``packing_utils.dequantize_gemm``) do. Forward: a folder ``python -m quantize`` wrote is decoded by
AutoAWQ, weight by weight, and a float model built from AutoAWQ's decode gives the same logits as this project's
runtime on that folder. Reverse: a folder whose every Linear was packed by AutoAWQ (with AutoAWQ's config fields)
loads in ``internvl_kernels.model.load_quantized_llm`` with the logits of AutoAWQ's decode. ``python -m quantize
check`` reads both folders.
"""
import json
import os

import pytest
import torch

from internvl_kernels.model import load_quantized_llm
from internvl_kernels.quant.checker import check_folder
from quantize.cli import main
from tests.test_quant_interop import _import_autoawq_gemm

REL = 1e-3
GS = 64


def _rel(a, b):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def awq_parts():
    return _import_autoawq_gemm()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from quantize.demo import load_smollm2

    model, tok = load_smollm2()
    model.model.layers = model.model.layers[:4]  # the real weights of the first 4 decoder layers: a format test
    model.config.num_hidden_layers = 4
    d = str(tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-4L")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _ids(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris.",
               return_tensors="pt")["input_ids"]


def _dense_from(folder, weights: dict):
    """A float32 LlamaForCausalLM from ``folder``'s 16-bit tensors plus ``weights`` for the quantized Linears."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    cfg.quantization_config = None
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {}
    for n in os.listdir(folder):
        if n.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, n)))
    sd = {k: v.float() for k, v in sd.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    sd.update({k + ".weight": w for k, w in weights.items()})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def _autoawq_decode(folder, pu):
    from safetensors.torch import load_file

    sd = {}
    for n in os.listdir(folder):
        if n.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, n)))
    names = sorted(k[:-len(".qweight")] for k in sd if k.endswith(".qweight"))
    return {n: pu.dequantize_gemm(sd[n + ".qweight"], sd[n + ".qzeros"], sd[n + ".scales"], 4, GS).float().t()
            for n in names}


def test_autoawq_decodes_our_awq_folder(awq_parts, smollm2, tmp_path, capsys):
    _, pu = awq_parts
    out = str(tmp_path / "ours-awq")
    assert main(["--model", smollm2, "--out", out, "--method", "rtn", "--format", "awq", "--group-size", str(GS),
                 "--target", "transformers", "--nsamples", "2", "--seqlen", "32", "--eval-windows", "0",
                 "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
    rep = check_folder(out, "transformers")
    assert rep["target"]["ok"] and rep["verdicts"]["internvl-kernels"]["verdict"] == "loads"
    ours = load_quantized_llm(out, dtype=torch.float32).eval()
    theirs = _autoawq_decode(out, pu)
    assert len(theirs) == 7 * 4
    for n, w in theirs.items():  # AutoAWQ's decode runs in fp16: equal up to fp16 rounding of (q - z) * s
        torch.testing.assert_close(w, ours.get_submodule(n).dequantize_weight().float(), rtol=2 ** -10, atol=1e-6)
    x = _ids(out)
    with torch.no_grad():
        assert _rel(_dense_from(out, theirs)(input_ids=x).logits, ours(input_ids=x).logits) <= REL


def test_our_runtime_loads_an_autoawq_packed_folder(awq_parts, smollm2, tmp_path):
    WQLinear_GEMM, pu = awq_parts
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    out = tmp_path / "autoawq-packed"
    out.mkdir()
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    sd.pop("lm_head.weight", None)  # tied
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for n, lin in linears:
        w = lin.weight.detach().float()
        o, i = w.shape
        wg = w.reshape(o, i // GS, GS)
        mx, mn = wg.amax(-1), wg.amin(-1)
        scales = ((mx - mn).clamp_min(1e-5) / 15).t().contiguous().half().float()  # [G, out]
        zeros = torch.clamp(torch.round(-mn.t() / scales), 0, 15)
        q = WQLinear_GEMM.from_linear(lin, 4, GS, scales=scales, zeros=zeros)
        del sd[n + ".weight"]
        for k in ("qweight", "qzeros", "scales"):
            sd[f"{n}.{k}"] = getattr(q, k).contiguous()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "awq", "zero_point": True, "group_size": GS, "bits": 4,
                                  "version": "gemm", "modules_to_not_convert": None}  # AutoAWQ's own fields
    with open(out / "config.json", "w") as f:
        json.dump(cfg, f)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(str(out))
    rep = check_folder(str(out))
    lay = rep["layout"]
    assert lay["method"] == "awq" and lay["awq_version"] == "gemm" and lay["n_quantized"] == len(linears)
    assert not lay["unconverted_dense"]
    for c in ("vllm", "transformers", "internvl-kernels"):
        assert rep["verdicts"][c]["verdict"] == "loads", (c, rep["verdicts"][c])
    ours = load_quantized_llm(str(out), dtype=torch.float32).eval()
    theirs = _autoawq_decode(str(out), pu)
    x = _ids(str(out))
    with torch.no_grad():
        assert _rel(ours(input_ids=x).logits, _dense_from(str(out), theirs)(input_ids=x).logits) <= REL
