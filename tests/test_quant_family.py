"""``python -m quantize`` on InternVL2 / 2.5 / 3 folders (Qwen2 with qkv bias, Phi-3 with packed projections,
InternLM2.5, 6B-V2.5 / 300M towers): AWQ folds exact, written checkpoints reload through the quantized runtime and
reproduce the fake-quantized model, --skip keeps fused groups whole."""
from __future__ import annotations

import json
import os

import pytest
import torch

from internvl_kernels.model import IMG_CONTEXT_TOKEN, InternVLChatModel
from internvl_kernels.checkpoint.files import load_state_dict
from internvl_kernels.model.testing import build_model, write_checkpoint
from quantize.blocks import LlamaBlock, Phi3Block, adapter_for, fold_scale
from quantize.engine import QuantSettings
from quantize.runner import RunConfig, load_model, run

FAST = dict(nsamples=4, seqlen=32, eval_windows=1, eval_images=1, max_calib_images=2, mm_samples=1, batch_size=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qfamily")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=9)
            for p in ("v2-phi3", "v2.5-qwen2", "v2.5-internlm2", "v3-qwen2-6b")}


def _block_inputs(lm, T=9, seed=0):
    x = torch.randn(2, T, lm.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    pos = torch.arange(T)[None]
    return x, {"position_embeddings": lm.model.rotary_emb(x, pos), "attention_mask": None}


@pytest.mark.parametrize("which", ["qwen2-mha", "qwen2-gqa", "phi3"])
def test_awq_fold_is_exact_for_the_new_llms(which):
    if which == "phi3":
        model, _ = build_model("v2-phi3", seed=2)
        lm = model.language_model
    else:
        from internvl_kernels.model.chat import build_language_model
        from internvl_kernels.model.testing import _llm_config, randomize_

        cfg = _llm_config("v2.5-qwen2", 300)
        if which == "qwen2-mha":
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        lm = build_language_model(cfg).eval()
        randomize_(lm, seed=3, std=0.1)  # non-zero q/k/v biases
    blk = lm.model.layers[0]
    ad = adapter_for(blk)
    assert isinstance(ad, Phi3Block if which == "phi3" else LlamaBlock)
    names = [g.name for g in ad.scale_groups()]
    assert ("v->o" in names) == (which != "qwen2-gqa")
    if which != "phi3":
        assert blk.self_attn.v_proj.bias is not None and blk.self_attn.v_proj.bias.abs().max() > 0
    x, kw = _block_inputs(lm)
    with torch.no_grad():
        ref = ad.forward(x, kw)
        lin = ad.linears()
        g = torch.Generator().manual_seed(1)
        for grp in ad.scale_groups():
            s = torch.rand(lin[grp.linears[0]].in_features, generator=g) * 3 + 0.2
            fold_scale(grp, lin, s)
        out = ad.forward(x, kw)
    assert not torch.isnan(out).any()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())


def test_v_to_o_fold_without_the_bias_would_be_wrong():
    # the check above can fail: folding v's rows but not its bias changes a Qwen2 block's output
    from internvl_kernels.model.chat import build_language_model
    from internvl_kernels.model.testing import _llm_config, randomize_

    cfg = _llm_config("v2.5-qwen2", 300)
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    lm = build_language_model(cfg).eval()
    randomize_(lm, seed=3, std=0.1)
    blk = lm.model.layers[0]
    ad = adapter_for(blk)
    x, kw = _block_inputs(lm)
    with torch.no_grad():
        ref = ad.forward(x, kw)
        s = torch.rand(blk.self_attn.o_proj.in_features) * 3 + 0.2
        blk.self_attn.v_proj.weight.div_(s[:, None])  # rows only, bias left alone
        blk.self_attn.o_proj.weight.mul_(s[None, :])
        out = ad.forward(x, kw)
    assert (out - ref).abs().max() > 1e-3


def _prompt(model, tok):
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = "<img>" + IMG_CONTEXT_TOKEN * model.num_image_token + "</img>\nDescribe the image."
    return tok(text, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("preset,method,fmt,bits,act", [
    ("v2.5-qwen2", "gptq", "gptq", 4, True),     # InternVL2.5-1B-like: Qwen2 qkv bias, tied embeddings
    ("v2-phi3", "awq", "awq", 4, False),         # InternVL2-4B-like: packed qkv_proj / gate_up_proj
    ("v3-qwen2-6b", "awq", "awq", 4, False),     # InternVL3-38B-like: 6B-V2.5 tower + Qwen2.5
    ("v2.5-internlm2", "rtn", "gptq_v2", 8, False),  # InternVL2.5-26B-like: InternLM2.5 wqkv merged on write
])
def test_family_quantized_folder_reloads_as_its_fake_quant_model(ckpts, tmp_path, preset, method, fmt, bits, act):
    from transformers import AutoTokenizer

    from internvl_kernels.quant.linear import QuantLinear

    lm = load_model(ckpts[preset])
    st = QuantSettings(method=method, bits=bits, group_size=32, fmt=fmt, act_order=act, progress=False)
    out = str(tmp_path / "q")
    rep = run(RunConfig(settings=st, out=out, **FAST), lm, log=lambda *a, **k: None)
    assert rep["parts"] == ["vision", "llm"]
    sd = load_state_dict(out)
    assert "vision_model.encoder.layers.0.attn.qkv.qweight" in sd
    if preset == "v2-phi3":
        assert "language_model.model.layers.0.self_attn.qkv_proj.qweight" in sd
        assert "language_model.model.layers.1.mlp.gate_up_proj.qweight" in sd
    elif "qwen2" in preset:
        assert "language_model.model.layers.0.self_attn.k_proj.qweight" in sd
        assert "language_model.model.layers.0.self_attn.k_proj.bias" in sd  # Qwen2's qkv bias kept beside it
    else:
        assert "language_model.model.layers.0.attention.wqkv.qweight" in sd
    fake = lm.model.eval().float()
    mq = InternVLChatModel.from_pretrained(out, dtype=torch.float32)
    n_quant = sum(isinstance(m, QuantLinear) for m in mq.modules())
    assert n_quant == rep["metrics"]["quantized_linears"]  # in-memory Linears (an InternLM2 wqkv counts as q, k, v)
    tok = AutoTokenizer.from_pretrained(out)
    ids = _prompt(mq, tok)
    _prompt(fake, tok)
    pv = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(mq.extract_feature(pv), fake.extract_feature(pv), rtol=1e-5, atol=1e-5)
        lq = mq(pixel_values=pv, input_ids=ids).logits
        torch.testing.assert_close(lq, fake(pixel_values=pv, input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.isnan(lq).any()
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(mq.generate(pixel_values=pv, input_ids=ids, **kw),
                       fake.generate(pixel_values=pv, input_ids=ids, **kw))
    assert rep["metrics"]["vit_feature_sqnr_db"] > 15


def test_skip_expands_fused_groups(ckpts, tmp_path):
    lm = load_model(ckpts["v2.5-qwen2"])
    st = QuantSettings(method="rtn", bits=8, group_size=32, fmt="gptq", progress=False,
                       skip=("language_model.model.layers.0.self_attn.k_proj", "*.layers.1.mlp.up_proj"))
    out = str(tmp_path / "q")
    run(RunConfig(settings=st, out=out, parts=("llm",), **FAST), lm, log=lambda *a, **k: None)
    sd = load_state_dict(out)
    for p in "qkv":  # k skipped → q, k, v all 16-bit
        assert f"language_model.model.layers.0.self_attn.{p}_proj.weight" in sd
        assert f"language_model.model.layers.1.self_attn.{p}_proj.qweight" in sd
    for p in ("gate", "up"):  # up skipped → gate too
        assert f"language_model.model.layers.1.mlp.{p}_proj.weight" in sd
        assert f"language_model.model.layers.0.mlp.{p}_proj.qweight" in sd
    with open(os.path.join(out, "quantize_config.json")) as f:
        nc = json.load(f)["modules_to_not_convert"]
    assert "language_model.model.layers.0.self_attn.q_proj" in nc and "language_model.model.layers.1.mlp.gate_proj" in nc
    assert "vision_model" in nc and "language_model.lm_head" in nc


def test_cli_quantizes_an_internvl25_folder(ckpts, tmp_path):
    from quantize.cli import main

    out = str(tmp_path / "cli")
    rc = main(["--model", ckpts["v2.5-qwen2"], "--method", "rtn", "--bits", "4", "--group-size", "32",
               "--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1",
               "--max-calib-images", "1", "--mm-samples", "1", "--out", out, "--no-progress"])
    assert rc in (0, None)
    qm = InternVLChatModel.from_pretrained(out)
    assert type(qm.language_model).__name__ == "Qwen2ForCausalLM"
    assert qm.quantization_summary["quantized_modules"]
