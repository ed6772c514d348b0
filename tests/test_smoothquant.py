"""SmoothQuant W8A8 of InternViT end to end: quantizer → compressed-tensors folder → runtime (W8A8Linear, patch_model).

The tower is a seeded random-init InternViT with the real 6B block structure (RMSNorm, QK-RMSNorm over all channels,
no qkv bias, layer scale, exact GELU, head_dim 128, 448 px tiles → 1025 tokens) at reduced width/depth (256 wide,
4 blocks), calibrated and evaluated on real photos (skimage.data through InternVL's dynamic tiler, held-out photos
disjoint from the calibration ones)."""
from __future__ import annotations

import json
import os

import pytest
import torch

import internvl_kernels as ik
from internvl_kernels import ops
from internvl_kernels.model import InternVisionModel
from internvl_kernels.model.configuration import InternVisionConfig
from internvl_kernels.checkpoint.files import load_state_dict, save_state_dict
from internvl_kernels.model.testing import randomize_, tiny_vision_config
from internvl_kernels.quant.w8a8 import W8A8Linear, compressed_tensors_config, parse_compressed_tensors_config
from quantize.smoothquant import LINEARS, SmoothQuantSettings, smooth_block

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _write_tower(path, hidden=256, layers=4, image_size=448, seed=0):
    cfg = InternVisionConfig(image_size=image_size, patch_size=14, hidden_size=hidden,
                             num_attention_heads=max(1, hidden // 128), intermediate_size=4 * hidden,
                             num_hidden_layers=layers, qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
                             layer_norm_eps=1e-6, initializer_factor=0.1)
    model = InternVisionModel(cfg)
    randomize_(model, seed)
    os.makedirs(path, exist_ok=True)
    d = cfg.to_dict()
    d["architectures"] = ["InternVisionModel"]
    d["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    save_state_dict(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def sq_run(tmp_path_factory):
    from quantize.runner import load_model
    from quantize.smoothquant import run_smoothquant

    root = tmp_path_factory.mktemp("sq")
    src = _write_tower(str(root / "vit"))
    lm = load_model(src)
    st = SmoothQuantSettings(alphas=(0.5, 0.8), search_tokens=2048, progress=False)
    out = str(root / "vit-w8a8")
    report = run_smoothquant(lm, st, max_calib_images=3, max_tiles=2, eval_images=2, out=out)
    return src, out, report, lm.model


def test_feature_sqnr_bar_and_report(sq_run):
    _, out, report, _ = sq_run
    m = report["metrics"]
    print("feature SQNR dB: smoothquant %.2f, rtn w8a8 %.2f, gptq w4a16 %.2f; alphas %s" % (
        m["vit_feature_sqnr_db"], m["vit_feature_sqnr_db_rtn_w8a8"], m["vit_feature_sqnr_db_gptq_w4a16"],
        [b["alpha"] for b in report["blocks"]]))
    # the bar: held-out photos, last_hidden_state of the W8A8 tower vs the float tower
    assert m["vit_feature_sqnr_db"] >= 30, m
    # reported beside plain per-token W8A8 (no migration) and W4A16 GPTQ on the same tower
    assert m["vit_feature_sqnr_db_rtn_w8a8"] >= 30 and m["vit_feature_sqnr_db_gptq_w4a16"] > 10
    # the α search never does worse than no migration on its own objective (it is one of the candidates)
    for b in report["blocks"]:
        assert b["search_mse"][str(b["alpha"]) if b["alpha"] is not None else "none"] == min(b["search_mse"].values())
        assert b["heldout_sqnr_db"] >= 30
    assert len(report["blocks"]) == 4
    saved = json.load(open(os.path.join(out, "quant_report.json")))
    assert saved["metrics"]["vit_feature_sqnr_db"] == pytest.approx(m["vit_feature_sqnr_db"])


def test_folder_is_compressed_tensors_w8a8(sq_run):
    _, out, _, _ = sq_run
    cfg = json.load(open(os.path.join(out, "config.json")))
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "int-quantized"
    assert q["quantization_status"] == "compressed"
    g = q["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"]
    assert g["weights"] | {} == g["weights"] and g["weights"]["num_bits"] == 8 and g["weights"]["type"] == "int"
    assert g["weights"]["strategy"] == "channel" and g["weights"]["symmetric"] and not g["weights"]["dynamic"]
    a = g["input_activations"]
    assert a["strategy"] == "token" and a["dynamic"] is True and a["type"] == "int" and a["num_bits"] == 8
    assert q["ignore"] == []
    sd = load_state_dict(out)
    for i in range(4):
        for n in LINEARS:
            k = f"encoder.layers.{i}.{n}"
            w, s = sd[f"{k}.weight"], sd[f"{k}.weight_scale"]
            assert w.dtype == torch.int8 and int(w.min()) >= -127
            assert s.dtype == torch.float32 and s.shape == (w.shape[0], 1) and bool((s > 0).all())
            assert f"{k}.input_scale" not in sd
            assert int(w.abs().amax(1).min()) == 127  # per-channel symmetric: every row uses the full range
    assert sd["encoder.layers.0.norm1.weight"].dtype == torch.float32
    assert not any(k.endswith(".qweight") for k in sd)


def test_folder_loads_and_matches_in_memory_model(sq_run):
    from quantize.calib import heldout_images

    _, out, _, mem = sq_run
    loaded = InternVisionModel.from_pretrained(out, dtype=torch.float32)
    mods = [m for m in loaded.modules() if isinstance(m, W8A8Linear)]
    assert len(mods) == 16 and all(m.quant_dtype == "int8" and m.input_scale is None for m in mods)
    assert not any(type(m) is torch.nn.Linear for m in loaded.encoder.modules())
    px = heldout_images(448, max_num=1, n=1)[0]
    with torch.no_grad(), ik.set_backend("eager"):
        a = loaded(px).last_hidden_state
        b = mem(px).last_hidden_state
    assert not torch.isnan(a).any()
    assert torch.equal(a, b)  # the same integer-exact W8A8 computation on the same tensors


def test_alpha_helps_when_activations_have_outlier_channels():
    # trained ViTs have a few huge activation channels; the norm weight puts them in the inputs of qkv / fc1
    torch.manual_seed(0)
    vit = InternVisionModel(tiny_vision_config("6b", num_layers=1))
    randomize_(vit, 3)
    blk = vit.encoder.layers[0]
    with torch.no_grad():
        blk.norm1.weight[:3] *= 60
        blk.norm2.weight[:3] *= 60
    x = torch.randn(4, 17, 128)
    _, _, info = smooth_block(blk, [(x, None)], SmoothQuantSettings(alphas=(0.3, 0.5, 0.7), progress=False))
    errs = info["search_mse"]
    assert info["alpha"] is not None
    assert errs[f"{info['alpha']:g}"] < 0.25 * errs["none"], errs


def test_patched_w8a8_tower_uses_fused_kernels(device):
    # a tiny tower with every Linear W8A8: patch_model's fused norm+quant / int8 GEMM path vs the eager reference
    torch.manual_seed(0)
    vit = InternVisionModel(tiny_vision_config("6b", num_layers=2))
    randomize_(vit, 1)
    vit.eval()
    for layer in vit.encoder.layers:
        for n in LINEARS:
            parent, _, child = n.rpartition(".")
            setattr(layer.get_submodule(parent), child, W8A8Linear.from_linear(layer.get_submodule(n)))
    vit.to(device)
    px = torch.randn(1, 3, 56, 56, device=device)
    with torch.no_grad(), ik.set_backend("eager"):
        ref = vit(px).last_hidden_state
    ik.patch_model(vit)
    before = {k: ops.launches(k) for k in ("add_rms_norm_quant", "rms_norm_quant", "int8_matmul", "quantize_per_token")}
    with torch.no_grad(), ik.set_backend("triton"), ops.poison_outputs():
        out = vit(px).last_hidden_state
    got = {k: ops.launches(k) - v for k, v in before.items()}
    assert got["rms_norm_quant"] == 1 and got["add_rms_norm_quant"] == 3  # norm1 of block 0, then the fused chain
    assert got["int8_matmul"] == 8 and got["quantize_per_token"] == 4  # proj and fc2 quantize their inputs
    assert not torch.isnan(out).any()
    from quantize.metrics import sqnr_db

    assert sqnr_db(ref, out) > 40  # equal up to the rare one-code flips of the normed values
    ik.unpatch_model(vit)


@pytest.mark.parametrize("qd,act", [("fp8", "static"), ("int8", "static")])
def test_cli_writes_a_folder_the_runtime_loads(tmp_path, qd, act):
    from quantize.cli import main

    src = _write_tower(str(tmp_path / "vit"), hidden=128, layers=2, image_size=224)
    out = str(tmp_path / "out")
    rc = main(["--model", src, "--parts", "vision", "--method", "smoothquant", "--w8a8-dtype", qd,
               "--act-scales", act, "--alphas", "0.5", "--max-calib-images", "2", "--max-tiles", "1",
               "--eval-images", "1", "--out", out, "--no-progress"])
    assert rc == 0
    q = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert q["format"] == ("float-quantized" if qd == "fp8" else "int-quantized")
    assert q["config_groups"]["group_0"]["input_activations"]["strategy"] == "tensor"
    assert q["config_groups"]["group_0"]["input_activations"]["dynamic"] is False
    sd = load_state_dict(out)
    assert sd["encoder.layers.0.attn.qkv.weight"].dtype == (torch.float8_e4m3fn if qd == "fp8" else torch.int8)
    assert sd["encoder.layers.1.mlp.fc2.input_scale"].dtype == torch.float32
    model = InternVisionModel.from_pretrained(out, dtype=torch.float32)
    lin = model.encoder.layers[1].mlp.fc2
    assert isinstance(lin, W8A8Linear) and lin.input_scale is not None and lin.quant_dtype == qd
    with torch.no_grad(), ik.set_backend("eager"):
        y = model(torch.randn(1, 3, 224, 224)).last_hidden_state
    assert not torch.isnan(y).any()
    rep = json.load(open(os.path.join(out, "quant_report.json")))
    assert rep["metrics"]["vit_feature_sqnr_db"] > 20


def test_cli_errors(tmp_path, capsys):
    from quantize.cli import main

    src = _write_tower(str(tmp_path / "vit"), hidden=128, layers=1, image_size=224)
    assert main(["--model", src, "--method", "smoothquant", "--parts", "llm", "--out", str(tmp_path / "o")]) == 2
    assert "vision tower only" in capsys.readouterr().err
    assert main(["--model", src, "--method", "smoothquant", "--alphas", "0.5,2", "--out", str(tmp_path / "o")]) == 2
    assert "[0, 1]" in capsys.readouterr().err


def test_config_round_trip_and_bad_configs():
    from internvl_kernels.quant.loading import UnsupportedQuantizationError

    for qd in ("int8", "fp8"):
        for act in ("dynamic", "static"):
            c = parse_compressed_tensors_config(compressed_tensors_config(qd, act, ["re:^mlp1\\..*"]))
            assert c == {"quant_dtype": qd, "static_input": act == "static", "ignore": ["re:^mlp1\\..*"]}
    bad = compressed_tensors_config("int8")
    bad["format"] = "pack-quantized"
    with pytest.raises(UnsupportedQuantizationError, match="format 'pack-quantized'"):
        parse_compressed_tensors_config(bad)
    bad = compressed_tensors_config("int8")
    bad["config_groups"]["group_0"]["weights"]["strategy"] = "group"
    with pytest.raises(UnsupportedQuantizationError, match="strategy 'group'"):
        parse_compressed_tensors_config(bad)
    bad = compressed_tensors_config("fp8")
    bad["config_groups"]["group_0"]["weights"]["type"] = "int"
    with pytest.raises(UnsupportedQuantizationError, match="8-bit symmetric float"):
        parse_compressed_tensors_config(bad)


def test_w8a8_linear_keeps_code_dtypes_under_to():
    lin = torch.nn.Linear(64, 32)
    m = W8A8Linear.from_linear(lin, "fp8")
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
    assert m.bias.dtype == torch.bfloat16 and m.dtype == torch.bfloat16
    y = m(torch.randn(3, 64, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 32)
    with pytest.raises(TypeError, match="nn.Linear"):
        W8A8Linear.from_linear(m)
