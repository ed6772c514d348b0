"""Model pipeline + writer on the tiny official-layout fixtures: written tensors decode to exactly the fake-quantized
model, InternLM2 wqkv merge, AWQ folding is exact, every supported checkpoint kind."""
import json
import os

import pytest
import torch

from internvl_kernels.model import InternVLChatModel, InternVisionModel
from internvl_kernels.checkpoint.files import load_state_dict, save_state_dict
from internvl_kernels.model.testing import build_model, build_tokenizer, write_checkpoint, write_vision_checkpoint
from internvl_kernels.quant import formats
from quantize.blocks import LlamaBlock, VitBlock, fold_scale
from quantize.engine import QuantSettings
from quantize.runner import RunConfig, load_model, run

FAST = dict(nsamples=4, seqlen=32, eval_windows=2, eval_images=1, max_calib_images=2, mm_samples=1, batch_size=2)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qpipe")
    out = {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=3) for p in ("v1.1", "v1.2", "v1.5")}
    out["vit300m"] = write_vision_checkpoint(str(root / "vit300m"), "300m", seed=4)
    return out


def dequantize_folder(qdir: str, dst: str) -> dict:
    """Independent reader: every quantized Linear → float ``.weight`` via internvl_kernels.quant.formats; writes a float folder."""
    with open(os.path.join(qdir, "config.json")) as f:
        cfg = json.load(f)
    q = cfg.pop("quantization_config")
    fmt = "awq" if q["quant_method"] == "awq" else q["checkpoint_format"]
    sd = load_state_dict(qdir)
    out = {}
    for k, v in sd.items():
        if k.endswith(".qweight"):
            base = k[: -len(".qweight")]
            t = {n: sd[f"{base}.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx") if f"{base}.{n}" in sd}
            out[base + ".weight"] = formats.dequantize(t, fmt, q["bits"], q["group_size"], torch.float32)
        elif not k.endswith((".qzeros", ".scales", ".g_idx")):
            out[k] = v
    os.makedirs(dst, exist_ok=True)
    save_state_dict(out, dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return q


def _run(path, tmp_path, **kw):
    st = QuantSettings(**{k: v for k, v in kw.items() if k in QuantSettings.__dataclass_fields__}, progress=False)
    rest = {k: v for k, v in kw.items() if k not in QuantSettings.__dataclass_fields__}
    lm = load_model(path)
    rc = RunConfig(settings=st, out=str(tmp_path / "q"), **{**FAST, **rest})
    rep = run(rc, lm)
    return lm, rep, str(tmp_path / "q")


@pytest.mark.parametrize("preset,method,fmt,act_order", [
    ("v1.5", "gptq", "gptq", True),   # InternLM2 layout: merged wqkv, act-order g_idx
    ("v1.2", "awq", "awq", False),    # GQA Llama: no v->o scaling; AWQ GEMM packing
    ("v1.1", "rtn", "gptq_v2", False),
])
def test_written_checkpoint_decodes_to_the_quantized_model(ckpts, tmp_path, preset, method, fmt, act_order):
    lm, rep, qdir = _run(ckpts[preset], tmp_path, method=method, fmt=fmt, bits=4, group_size=32,
                         act_order=act_order)
    sd = load_state_dict(qdir)
    if preset == "v1.5":
        assert "language_model.model.layers.0.attention.wqkv.qweight" in sd
        assert not any("q_proj" in k for k in sd)
    assert "vision_model.encoder.layers.0.attn.qkv.qweight" in sd and "mlp1.1.weight" in sd
    assert not any(k.startswith("mlp1.") and k.endswith("qweight") for k in sd)  # projector stays 16-bit
    q = dequantize_folder(qdir, str(tmp_path / "float"))
    assert q["quant_method"] == ("awq" if fmt == "awq" else "gptq")
    assert "mlp1" in q["modules_to_not_convert"] and q["quantized_modules"]
    with open(os.path.join(qdir, "quantize_config.json")) as f:
        assert json.load(f)["bits"] == 4
    assert os.path.isfile(os.path.join(qdir, "tokenizer.json"))  # tokenizer copied
    assert os.path.isfile(os.path.join(qdir, "generation_config.json"))
    reloaded = InternVLChatModel.from_pretrained(str(tmp_path / "float"))
    mine = lm.model.official_state_dict()
    theirs = reloaded.official_state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k].float(), theirs[k].float()), k
    # the report has the promised pieces
    m = rep["metrics"]
    assert m["vit_feature_sqnr_db"] > 15 and m["llm_ppl_quant"] > 1 and m["llm_ppl_float"] > 1
    assert all(r["weight_rel_err"] > 0 for r in rep["layers"])
    assert os.path.isfile(os.path.join(qdir, "quant_report.json"))


def test_standalone_vit_and_plain_llm(ckpts, tmp_path):
    lm, rep, qdir = _run(ckpts["vit300m"], tmp_path, method="awq", fmt="gptq", bits=4, group_size=32)
    sd = load_state_dict(qdir)
    assert "encoder.layers.0.attn.qkv.qweight" in sd and "encoder.layers.0.attn.qkv.bias" in sd
    dequantize_folder(qdir, str(tmp_path / "vf"))
    v = InternVisionModel.from_pretrained(str(tmp_path / "vf"))
    for k, t in lm.model.state_dict().items():
        assert torch.equal(t.float(), v.state_dict()[k].float()), k
    assert rep["parts"] == ["vision"] and "vit_feature_sqnr_db" in rep["metrics"]

    # a plain transformers Llama folder
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(cfg)
    src = tmp_path / "llama"
    llm.save_pretrained(src)
    tok.save_pretrained(src)
    st = QuantSettings(method="gptq", bits=3, group_size=32, fmt="gptq_v2", progress=False)
    rep = run(RunConfig(settings=st, out=str(tmp_path / "lq"), **FAST), load_model(str(src)))
    sd = load_state_dict(str(tmp_path / "lq"))
    assert "model.layers.1.mlp.down_proj.qweight" in sd and "lm_head.weight" not in sd
    assert sd["model.layers.1.mlp.down_proj.qweight"].shape == (128 * 3 // 32, 64)
    assert rep["parts"] == ["llm"] and rep["metrics"]["llm_ppl_quant"] > 1


@pytest.mark.parametrize("kind", ["vit6b", "vit300m", "llama"])
def test_awq_fold_is_exact(kind):
    torch.manual_seed(0)
    if kind == "llama":
        model, _ = build_model("v1.1", seed=2)  # MHA: v->o group present
        blk = model.language_model.model.layers[0]
        ad = LlamaBlock(blk)
        x = torch.randn(2, 9, 64)
        pos = torch.arange(9)[None]
        kw = {"position_embeddings": model.language_model.model.rotary_emb(x, pos), "attention_mask": None}
        assert [g.name for g in ad.scale_groups()][1] == "v->o"
    else:
        from internvl_kernels.model.testing import randomize_, tiny_vision_config
        from internvl_kernels.model.vision import InternVisionEncoderLayer

        blk = InternVisionEncoderLayer(tiny_vision_config("6b" if kind == "vit6b" else "300m"))
        randomize_(blk, 5)
        ad, x, kw = VitBlock(blk), torch.randn(2, 17, 128), None
    with torch.no_grad():
        ref = ad.forward(x, kw)
        lin = ad.linears()
        for g in ad.scale_groups():
            s = torch.rand(lin[g.linears[0]].in_features) * 3 + 0.2
            fold_scale(g, lin, s)
        out = ad.forward(x, kw)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())


def test_skip_patterns_and_internlm2_qkv_tie(ckpts, tmp_path):
    lm, rep, qdir = _run(ckpts["v1.5"], tmp_path, method="rtn", fmt="gptq", bits=8, group_size=32,
                         skip=("language_model.model.layers.1.self_attn.k_proj", "*.mlp.fc2"), parts=("vision", "llm"))
    sd = load_state_dict(qdir)
    assert "language_model.model.layers.1.attention.wqkv.weight" in sd  # k skipped → whole wqkv stays 16-bit
    assert "language_model.model.layers.0.attention.wqkv.qweight" in sd
    assert "vision_model.encoder.layers.0.mlp.fc2.weight" in sd
    q = json.load(open(os.path.join(qdir, "quantize_config.json")))
    assert "language_model.model.layers.1.attention.wqkv" in q["modules_to_not_convert"]
    assert "vision_model.encoder.layers.2.mlp.fc2" in q["modules_to_not_convert"]
    assert rep["metrics"]["vit_feature_sqnr_db"] > 35  # W8


def test_sink_weight_changes_only_k_and_v(ckpts, tmp_path):
    from quantize.engine import PipelineResult, quantize_stack
    from quantize.streams import Stream, llm_streams

    out = {}
    for sw in (1.0, 512.0):
        model, tok = build_model("v1.1", seed=7)
        lm = model.language_model
        ids = torch.randint(0, len(tok), (4, 24), generator=torch.Generator().manual_seed(0))
        calib = llm_streams(lm, [{"input_ids": ids}], "cpu")
        st = QuantSettings(method="gptq", bits=4, group_size=32, fmt="gptq_v2", sink_weight=sw, progress=False)
        res = PipelineResult()
        quantize_stack(torch.nn.ModuleList(lm.model.layers[:1]), "l", calib, st, res)
        out[sw] = res.results
    same = lambda n: torch.equal(out[1.0][n].intweight, out[512.0][n].intweight)  # noqa: E731
    assert same("l.0.self_attn.q_proj")
    assert not same("l.0.self_attn.k_proj") and not same("l.0.self_attn.v_proj")


@pytest.mark.parametrize("preset,fmt,method", [("v1.5", "gptq", "gptq"), ("v1.2", "awq", "awq"),
                                               ("v1.1", "gptq_v2", "rtn")])
def test_quantized_runtime_loads_the_written_checkpoint(ckpts, tmp_path, preset, fmt, method):
    """Integration with the quantized runtime (internvl_kernels.quant): it reproduces the fake-quantized model."""
    pytest.importorskip("internvl_kernels.quant.loading")
    lm, _, qdir = _run(ckpts[preset], tmp_path, method=method, fmt=fmt, bits=4, group_size=32,
                       act_order=method == "gptq")
    qm = InternVLChatModel.from_pretrained(qdir)
    g = torch.Generator().manual_seed(1)
    pv, ids = torch.randn(2, 3, 56, 56, generator=g), torch.randint(0, 300, (1, 12), generator=g)
    with torch.no_grad():
        assert torch.allclose(qm.language_model(ids).logits, lm.model.language_model(ids).logits, atol=1e-5)
        assert torch.allclose(qm.extract_feature(pv), lm.model.extract_feature(pv), atol=1e-5)
