"""Loading quantized checkpoints: InternVL-Chat folders (every preset, GPTQ v1 / gptq_v2 / AWQ, ViT quantized or not,
InternLM2 packed wqkv) and plain transformers LLM folders, compared with the fake-quantized float model (the same
dequantized weights in plain nn.Linear): logits within tolerance, identical greedy tokens in fp32.

The quantized folders here are written by a small writer in this file (RTN / GPTQ codes from
``quantize.quantize_linear`` packed with ``QuantResult.pack``, official key names, ``quantization_config`` as
``internvl_kernels.quant.formats.quantization_config`` builds it), so the loader is tested on its own; the quantizer's CLI output
is loaded in :func:`test_quantizer_cli_output_loads`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import pytest
import torch
import torch.nn as nn

import internvl_kernels
import quantize
from internvl_kernels.model import CheckpointError, InternVLChatModel
from internvl_kernels.checkpoint.files import load_state_dict, save_state_dict
from internvl_kernels.model.testing import PRESETS, write_checkpoint, write_vision_checkpoint
from internvl_kernels.ops import _common
from internvl_kernels.model import load_quantized_llm, load_quantized_vit
from internvl_kernels.quant import QuantLinear, dequantize_model
from internvl_kernels.quant.loading import UnsupportedQuantizationError
from internvl_kernels.quant import formats as fm

VISION_LINEAR = re.compile(r"^(vision_model\.)?encoder\.layers\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.weight$")
LLM_LINEAR = re.compile(r"^(language_model\.)?model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|"
                        r"attention\.wqkv|attention\.wo|feed_forward\.w[123])\.weight$")


# ------------------------------------------------------------------------------------------------------ writer
def quantize_folder(src: str, dst: str, fake_dst: str | None, layout: str, bits: int = 4, group_size: int = 32,
                    parts=("vision", "llm"), method: str = "rtn", act_order: bool = False, seed: int = 0,
                    bits_for=None, extra_cfg: dict | None = None) -> list[str]:
    """Quantize the Linear layers of a checkpoint folder (official keys) into ``dst`` (GPTQ/AWQ tensors +
    quantization_config) and write the fake-quantized float twin to ``fake_dst``. Returns the quantized names."""
    sd = load_state_dict(src)
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    g = torch.Generator().manual_seed(seed)
    qsd, fake, names = {}, dict(sd), []
    for key, w in sd.items():
        is_vis, is_llm = bool(VISION_LINEAR.match(key)), bool(LLM_LINEAR.match(key))
        if not ((is_vis and "vision" in parts) or (is_llm and "llm" in parts)):
            if key not in qsd:
                qsd[key] = w
            continue
        name = key[: -len(".weight")]
        b = bits_for(name) if bits_for else bits
        calib = torch.randn(256, w.shape[1], generator=g) * (0.5 + torch.rand(w.shape[1], generator=g))
        r = quantize.quantize_linear(w.float(), calib, method=method, bits=b, group_size=group_size,
                                     act_order=act_order, sym=False, min_zero=1 if layout == "gptq" else 0)
        for k, t in r.pack(layout).items():
            qsd[f"{name}.{k}"] = t
        fake[key] = r.dequantized_stored.to(w.dtype)
        names.append(name)
    os.makedirs(dst, exist_ok=True)
    save_state_dict(qsd, dst, max_shard_size=256 * 1024)
    skip = [p for p, tag in (("vision_model", "vision"), ("language_model", "llm")) if tag not in parts] + ["mlp1"]
    qcfg = fm.quantization_config(layout, bits, group_size, sym=False, desc_act=act_order,
                                  modules_to_not_convert=skip, quantized_modules=names, method=method,
                                  extra=extra_cfg)
    cfg = dict(raw, quantization_config=qcfg)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    for fn in os.listdir(src):
        if not fn.endswith((".safetensors", ".json")) or fn.startswith(("tokenizer", "special", "generation")):
            p = os.path.join(src, fn)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(dst, fn))
    if fake_dst:
        shutil.copytree(src, fake_dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
        save_state_dict(fake, fake_dst, max_shard_size=256 * 1024)
    return names


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_base")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=3) for p in PRESETS}


def _prompt(model, tok, tiles=1):
    from internvl_kernels.model import IMG_CONTEXT_TOKEN

    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = "<img>" + IMG_CONTEXT_TOKEN * model.num_image_token * tiles + "</img>\nDescribe the picture."
    return tok(text, return_tensors="pt")["input_ids"]


def _compare_chat_models(qdir, fdir, *, tiles=1, tol=2e-4, n_new=6):
    from transformers import AutoTokenizer

    mq = InternVLChatModel.from_pretrained(qdir, dtype=torch.float32)
    mf = InternVLChatModel.from_pretrained(fdir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(qdir)
    pv = torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    ids = _prompt(mq, tok, tiles)
    _prompt(mf, tok, tiles)
    with torch.no_grad():
        fq, ff = mq.extract_feature(pv), mf.extract_feature(pv)
        torch.testing.assert_close(fq, ff, rtol=tol, atol=tol)
        lq = mq(pixel_values=pv, input_ids=ids).logits
        lf = mf(pixel_values=pv, input_ids=ids).logits
    assert torch.isfinite(lq).all()
    scale = float(lf.abs().max())
    assert float((lq - lf).abs().max()) <= tol * max(1.0, scale), "logits differ from the fake-quantized model"
    kw = dict(max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    gq = mq.generate(pixel_values=pv, input_ids=ids, **kw)
    gf = mf.generate(pixel_values=pv, input_ids=ids, **kw)
    assert torch.equal(gq, gf), f"greedy tokens differ: {gq.tolist()} vs {gf.tolist()}"
    return mq, mf


def _quant_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


# ------------------------------------------------------------------------------------------- InternVL folders
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("layout,bits", [("gptq", 4), ("gptq_v2", 8), ("awq", 4)])
def test_internvl_quantized_folder_matches_fake_quant(base, tmp_path, preset, layout, bits):
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    names = quantize_folder(base[preset], q, f, layout, bits)
    mq, _ = _compare_chat_models(q, f)
    got = _quant_names(mq)
    n_vit = sum(1 for n in names if n.startswith("vision_model."))
    assert n_vit > 0
    assert n_vit == 4 * mq.config.vision_config.num_hidden_layers
    assert sum(1 for n in got if n.startswith("vision_model.")) == n_vit
    n_layers = mq.language_model.config.num_hidden_layers
    assert sum(1 for n in got if n.startswith("language_model.")) == 7 * n_layers  # wqkv split into q, k, v
    assert not any(n.startswith("mlp1") or n.endswith("lm_head") for n in got)
    if preset == "v1.5":
        assert mq.quantization_summary["split_wqkv"], "InternLM2 wqkv should have been split"
        assert isinstance(mq.language_model.model.layers[0].self_attn.k_proj, QuantLinear)


def test_llm_only_checkpoint_keeps_vit_dense_and_logs_bytes(base, tmp_path, caplog):
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    quantize_folder(base["v1.2"], q, f, "gptq", 4, parts=("llm",))
    with caplog.at_level(logging.INFO, logger="internvl_kernels"):
        mq, mf = _compare_chat_models(q, f)
    assert not any(isinstance(m, QuantLinear) for m in mq.vision_model.modules())
    assert all(n.startswith("language_model.") for n in _quant_names(mq))
    s = mq.quantization_summary
    assert s["bytes_after"] < s["bytes_before"]
    msgs = [r.getMessage() for r in caplog.records if "quantized runtime" in r.getMessage()]
    assert msgs and "dense-equivalent" in msgs[0] and "quantized" in msgs[0]
    # the bytes the loaded model really holds agree with what was logged before loading
    held = sum(t.numel() * t.element_size() for t in list(mq.parameters()) + list(mq.buffers()))
    assert held == s["bytes_after"]


def test_act_order_gptq_checkpoint(base, tmp_path):
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    quantize_folder(base["v1.5"], q, f, "gptq_v2", 4, method="gptq", act_order=True)
    mq, _ = _compare_chat_models(q, f)
    assert any(m.act_order for m in mq.modules() if isinstance(m, QuantLinear))


def test_triton_backend_runs_the_quantized_model(base, tmp_path):
    """The Triton kernels (interpreter on CPU) inside the loaded model: one ViT pass, then greedy decoding from the
    image features (prefill + decode steps through the split-K kernel); logits of every step vs the fake-quant model."""
    from transformers import AutoTokenizer

    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    quantize_folder(base["v1.5"], q, f, "awq", 4)
    mq = InternVLChatModel.from_pretrained(q, dtype=torch.float32)
    mf = InternVLChatModel.from_pretrained(f, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(q)
    pv = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    ids = _prompt(mq, tok)
    _prompt(mf, tok)
    kw = dict(max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id,
              return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        feats_f = mf.extract_feature(pv)
        out_f = mf.generate(input_ids=ids, visual_features=feats_f, **kw)
        with internvl_kernels.set_backend("triton"), _common.poison_outputs():
            n0 = _common.launches("quant_matmul")
            feats_q = mq.extract_feature(pv)
            out_q = mq.generate(input_ids=ids, visual_features=feats_q, **kw)
            assert _common.launches("quant_matmul") > n0
    torch.testing.assert_close(feats_q, feats_f, rtol=5e-4, atol=5e-4)
    for lq, lf in zip(out_q.logits, out_f.logits):
        assert torch.isfinite(lq).all()
        torch.testing.assert_close(lq, lf, rtol=5e-4, atol=5e-4)
    assert torch.equal(out_q.sequences, out_f.sequences)


def test_bf16_load_keeps_fp16_scales(base, tmp_path):
    q = str(tmp_path / "q")
    quantize_folder(base["v1.1"], q, None, "gptq", 4)
    m = InternVLChatModel.from_pretrained(q, dtype=torch.bfloat16)
    ql = [mod for mod in m.modules() if isinstance(mod, QuantLinear)]
    assert ql and all(mod.scales.dtype == torch.float16 and mod.qweight.dtype == torch.int32 for mod in ql)
    assert m.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(q)
    pv = torch.randn(1, 3, 56, 56, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = m(pixel_values=pv, input_ids=_prompt(m, tok)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_per_module_bits_via_dynamic(base, tmp_path):
    """GPTQModel-style ``dynamic`` overrides: the ViT at 8 bits, the LLM at 4."""
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    quantize_folder(base["v1.1"], q, f, "gptq_v2", 4, bits_for=lambda n: 8 if n.startswith("vision_model") else 4,
                    extra_cfg={"dynamic": {r"+:vision_model\..*": {"bits": 8}}})
    mq, _ = _compare_chat_models(q, f)
    bits = {n: m.bits for n, m in mq.named_modules() if isinstance(m, QuantLinear)}
    assert {b for n, b in bits.items() if n.startswith("vision_model")} == {8}
    assert {b for n, b in bits.items() if n.startswith("language_model")} == {4}


# ------------------------------------------------------------------------------------------------ error paths
def _edit_config(folder, fn):
    p = os.path.join(folder, "config.json")
    with open(p, encoding="utf-8") as f:
        cfg = json.load(f)
    fn(cfg)
    with open(p, "w", encoding="utf-8") as f:
        json.dump(cfg, f)


@pytest.mark.parametrize("edit,exc,msg", [
    (lambda c: c["quantization_config"].update(bits=8), CheckpointError, r"qweight: checkpoint shape .* implies 4-bit"),
    (lambda c: c["quantization_config"].update(quant_method="bitsandbytes"), UnsupportedQuantizationError,
     "quant_method 'bitsandbytes' is not supported"),
    (lambda c: c["quantization_config"].update(checkpoint_format="marlin"), UnsupportedQuantizationError,
     "checkpoint_format 'marlin'"),
    (lambda c: c["quantization_config"].update(group_size=64), CheckpointError, r"qzeros: checkpoint shape"),
])
def test_bad_quantization_config_is_named(base, tmp_path, edit, exc, msg):
    q = str(tmp_path / "q")
    quantize_folder(base["v1.2"], q, None, "gptq", 4)
    _edit_config(q, edit)
    with pytest.raises(exc, match=msg):
        InternVLChatModel.from_pretrained(q)


def test_awq_gemv_and_missing_tensor_are_named(base, tmp_path):
    q = str(tmp_path / "q")
    quantize_folder(base["v1.2"], q, None, "awq", 4)
    _edit_config(q, lambda c: c["quantization_config"].update(version="gemv"))
    with pytest.raises(UnsupportedQuantizationError, match="AWQ version 'gemv'"):
        InternVLChatModel.from_pretrained(q)
    _edit_config(q, lambda c: c["quantization_config"].update(version="gemm"))
    sd = load_state_dict(q)
    victim = next(k for k in sd if k.endswith("mlp.fc1.scales"))
    del sd[victim]
    for fn in os.listdir(q):
        if fn.endswith((".safetensors", ".index.json")):
            os.remove(os.path.join(q, fn))
    save_state_dict(sd, q)
    with pytest.raises(CheckpointError, match=re.escape(victim.rsplit(".", 1)[0]) + ".* no .*scales"):
        InternVLChatModel.from_pretrained(q)


# ------------------------------------------------------------------------------------------ plain LLM folders
def _write_llm_folder(base_dir: str, dst: str) -> None:
    """The LLM of a preset as a standalone transformers folder (config = llm_config, keys without the prefix)."""
    with open(os.path.join(base_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    pre = "language_model."
    sd = {k[len(pre):]: v for k, v in load_state_dict(base_dir).items() if k.startswith(pre)}
    os.makedirs(dst, exist_ok=True)
    save_state_dict(sd, dst)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw["llm_config"], f)


@pytest.mark.parametrize("preset,layout", [("v1.1", "gptq"), ("v1.2", "awq"), ("v1.5", "gptq_v2"), ("v1.5", "awq")])
def test_plain_llm_folder(base, tmp_path, preset, layout):
    from transformers import LlamaForCausalLM

    src = str(tmp_path / "llm")
    _write_llm_folder(base[preset], src)
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    quantize_folder(src, q, f, layout, 4, parts=("llm",))
    mq = load_quantized_llm(q, dtype=torch.float32)
    assert isinstance(mq, LlamaForCausalLM)
    n = mq.config.num_hidden_layers
    assert len(_quant_names(mq)) == 7 * n
    # the float twin: same loader path without quantization_config → dequantize our model instead
    mf = dequantize_model(load_quantized_llm(q, dtype=torch.float32))
    assert not _quant_names(mf)
    ids = torch.randint(4, mq.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq, lf = mq(input_ids=ids).logits, mf(input_ids=ids).logits
    torch.testing.assert_close(lq, lf, rtol=1e-4, atol=1e-4)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(mq.generate(input_ids=ids[:1], **kw), mf.generate(input_ids=ids[:1], **kw))
    # and the fake-quant folder written from the same codes gives the same logits through the reference loader
    if preset != "v1.5":
        ref = LlamaForCausalLM.from_pretrained(f, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(ref(input_ids=ids).logits, lq, rtol=1e-4, atol=1e-4)


def test_plain_llm_quantize_config_json_only(base, tmp_path):
    """AutoGPTQ-era folders keep the settings in quantize_config.json only."""
    src = str(tmp_path / "llm")
    _write_llm_folder(base["v1.1"], src)
    q = str(tmp_path / "q")
    quantize_folder(src, q, None, "gptq", 4, parts=("llm",))
    with open(os.path.join(q, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    qc = cfg.pop("quantization_config")
    qc.pop("quant_method")
    with open(os.path.join(q, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with open(os.path.join(q, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(qc, f)
    m = load_quantized_llm(q, dtype=torch.float32)
    assert len(_quant_names(m)) == 7 * m.config.num_hidden_layers
    os.remove(os.path.join(q, "quantize_config.json"))
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized_llm(q)


def test_replace_rejects_non_linear_targets():
    from internvl_kernels.quant import replace_with_quant_linear

    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    r = quantize.quantize_linear(torch.randn(32, 64), method="rtn", bits=4, group_size=32)
    sd = {f"1.{k}": v for k, v in r.pack("gptq_v2").items()}
    with pytest.raises(CheckpointError, match="is a LayerNorm, not a Linear"):
        replace_with_quant_linear(model, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                          "checkpoint_format": "gptq_v2"}, sd)
    sd = {f"7.{k}": v for k, v in r.pack("gptq_v2").items()}
    with pytest.raises(CheckpointError, match="has no module '7'"):
        replace_with_quant_linear(model, {"quant_method": "gptq", "bits": 4, "group_size": 32}, sd)
    sd = {f"0.{k}": v for k, v in r.pack("gptq_v2").items()}
    names = replace_with_quant_linear(model, {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                              "checkpoint_format": "gptq_v2"}, sd)
    assert names == ["0"] and isinstance(model[0], QuantLinear)


# ------------------------------------------------------------------------------------- standalone InternViT folders
@pytest.mark.parametrize("kind,layout", [("6b", "gptq"), ("300m", "awq")])
def test_standalone_internvit_folder(tmp_path, kind, layout):
    from internvl_kernels.model import InternVisionModel

    src = write_vision_checkpoint(str(tmp_path / "vit"), kind, seed=5, num_layers=2)
    q, f = str(tmp_path / "q"), str(tmp_path / "f")
    names = quantize_folder(src, q, f, layout, 4, parts=("vision",))
    assert len(names) == 8
    mq = load_quantized_vit(q)
    mf = InternVisionModel.from_pretrained(f)
    assert len(_quant_names(mq)) == 8
    if kind == "300m":  # qkv has a bias: kept next to the quantized tensors
        assert mq.encoder.layers[0].attn.qkv.bias is not None
    pv = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = mq.forward_features(pv, -1)
        b = mf.forward_features(pv, -1)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------- the quantizer's own output
QUANTIZER_CASES = [  # preset, method, format, bits, act_order
    ("v1.1", "gptq", "gptq", 4, True),
    ("v1.2", "rtn", "gptq_v2", 8, False),
    ("v1.5", "awq", "awq", 4, False),
    ("v1.5", "gptq", "gptq_v2", 3, False),
]


@pytest.mark.parametrize("preset,method,fmt,bits,act", QUANTIZER_CASES)
def test_quantizer_output_matches_its_fake_quant_model(base, tmp_path, preset, method, fmt, bits, act):
    """``quantize`` (the issue-4 pipeline: calibrate, quantize ViT + LLM, write) → ``from_pretrained`` → QuantLinear
    model; the quantizer's in-memory model after the run holds the same dequantized weights (AWQ scales folded) in
    plain Linears: features and logits agree, greedy tokens are identical (fp32)."""
    runner = pytest.importorskip("quantize.runner", reason="the quantizer pipeline (quantize.runner) is not present")
    from quantize.engine import QuantSettings
    from transformers import AutoTokenizer

    lm = runner.load_model(base[preset])
    st = QuantSettings(method=method, bits=bits, group_size=32, fmt=fmt, act_order=act, progress=False)
    out = str(tmp_path / "q")
    rc = runner.RunConfig(settings=st, nsamples=4, seqlen=32, eval_windows=1, eval_images=1, max_calib_images=2,
                          mm_samples=1, out=out)
    runner.run(rc, lm, log=lambda *a, **k: None)
    fake = lm.model.eval().float()
    mq = InternVLChatModel.from_pretrained(out, dtype=torch.float32)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qcfg = json.load(f)["quantization_config"]
    listed = qcfg["quantized_modules"]
    assert any(n.startswith("vision_model.") for n in listed) and any(n.startswith("language_model.") for n in listed)
    got = _quant_names(mq)
    want = set()
    for n in listed:  # checkpoint (InternLM2) names → the runtime's Llama-layout modules
        if n.endswith("attention.wqkv"):
            want |= {n.replace("attention.wqkv", f"self_attn.{p}_proj") for p in "qkv"}
        else:
            want.add(n.replace("attention.wo", "self_attn.o_proj").replace("feed_forward.w1", "mlp.gate_proj")
                     .replace("feed_forward.w3", "mlp.up_proj").replace("feed_forward.w2", "mlp.down_proj"))
    assert set(got) == want
    assert all(m.bits == bits for m in mq.modules() if isinstance(m, QuantLinear))
    tok = AutoTokenizer.from_pretrained(out)
    pv = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ids = _prompt(mq, tok)
    _prompt(fake, tok)
    with torch.no_grad():
        torch.testing.assert_close(mq.extract_feature(pv), fake.extract_feature(pv), rtol=1e-5, atol=1e-5)
        lq = mq(pixel_values=pv, input_ids=ids).logits
        lf = fake(pixel_values=pv, input_ids=ids).logits
    torch.testing.assert_close(lq, lf, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(mq.generate(pixel_values=pv, input_ids=ids, **kw),
                       fake.generate(pixel_values=pv, input_ids=ids, **kw))
