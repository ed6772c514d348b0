"""Non-finite (NaN / Inf) weights: refused before any work by the quantizer for every method and format, naming the
tensor; refused at load time by the runtime loaders (``CheckpointError`` naming the tensor and its file)."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_kernels.model import CheckpointError, InternVLChatModel, InternVisionModel
from internvl_kernels.checkpoint.files import load_state_dict
from internvl_kernels.model.testing import build_model, write_checkpoint, write_vision_checkpoint
from quantize import parts as parts_mod
from quantize import runner
from quantize.cli import main
from quantize.engine import QuantSettings

TINY = ["--nsamples", "2", "--seqlen", "16", "--eval-windows", "1", "--eval-images", "1", "--max-calib-images", "1",
        "--mm-samples", "0", "--group-size", "32", "--no-progress", "--device", "cpu"]
POISONED = "language_model.model.layers.1.mlp.down_proj.weight"
METHODS = [("gptq", "gptq"), ("gptq", "gptq_v2"), ("rtn", "gptq"), ("rtn", "gptq_v2"), ("awq", "awq")]


def _poison_folder(folder, key_suffix, value):
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(folder, name)
        sd = load_file(path)
        hit = [k for k in sd if k.endswith(key_suffix)]
        if hit:
            sd[hit[0]].view(-1)[3] = value
            save_file(sd, path, metadata={"format": "pt"})
            return hit[0], name
    raise AssertionError(f"no tensor ending in {key_suffix}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("method,fmt", METHODS)
def test_quantizer_refuses_non_finite_weight_before_work(tmp_path, method, fmt, value):
    """In-memory model (the demo / transformers-LLM path has no loader check): the run stops in validation."""
    model, tok = build_model("v1.2", seed=1)
    with torch.no_grad():
        model.get_parameter(POISONED).view(-1)[5] = value
    lm = runner.LoadedModel("internvl_chat", model, model.config.to_dict(), tok, None, "tiny")
    st = QuantSettings(method=method, bits=4, group_size=32, fmt=fmt, progress=False)
    out = tmp_path / "q"
    rc = runner.RunConfig(settings=st, nsamples=2, seqlen=16, eval_windows=1, eval_images=1, max_calib_images=1,
                          mm_samples=0, out=str(out))
    calls = []
    orig = parts_mod.calibration_images  # the parts draw the calibration data (quantize.parts)
    parts_mod.calibration_images = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        with pytest.raises(runner.QuantizeError, match=r"language_model\.model\.layers\.1\.mlp\.down_proj\.weight.*"
                                                       r"(NaN|Inf)"):
            runner.run(rc, lm, log=lambda *a, **k: None)
    finally:
        parts_mod.calibration_images = orig
    assert calls == [], "calibration ran before the weights were validated"
    assert not out.exists() and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_cli_refuses_poisoned_checkpoint(tmp_path, capsys, value):
    src = write_checkpoint(str(tmp_path / "v1_5"), "v1.5", seed=2)
    key, shard = _poison_folder(src, "feed_forward.w2.weight", value)
    out = tmp_path / "q"
    code = main(["--model", src, "--out", str(out), "--method", "rtn"] + TINY)
    err = capsys.readouterr().err
    assert code == 2 and key in err and shard in err and "non-finite" in err, err
    assert "Traceback" not in err and not out.exists()


def test_runtime_refuses_poisoned_chat_checkpoint(tmp_path):
    src = write_checkpoint(str(tmp_path / "v1_2"), "v1.2", seed=2)
    key, shard = _poison_folder(src, "self_attn.q_proj.weight", float("nan"))
    with pytest.raises(CheckpointError, match="non-finite") as e:
        InternVLChatModel.from_pretrained(src)
    assert key in str(e.value) and shard in str(e.value)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_state_dict(src)


def test_runtime_refuses_poisoned_vit_and_quantized_scales(tmp_path):
    vit = write_vision_checkpoint(str(tmp_path / "vit"), "6b", seed=1)
    key, _ = _poison_folder(vit, "attn.proj.weight", float("inf"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*non-finite"):
        InternVisionModel.from_pretrained(vit)
    # a quantized checkpoint whose fp16 scales hold an Inf
    src = write_checkpoint(str(tmp_path / "v1_2"), "v1.2", seed=2)
    q = str(tmp_path / "q")
    assert main(["--model", src, "--out", q, "--method", "rtn", "--parts", "llm"] + TINY) == 0
    key, shard = _poison_folder(q, "mlp.up_proj.scales", float("inf"))
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.") + ".*non-finite"):
        InternVLChatModel.from_pretrained(q)


def test_finite_checkpoint_still_loads(tmp_path):
    src = write_checkpoint(str(tmp_path / "v1_2"), "v1.2", seed=2)
    sd = load_state_dict(src)
    assert all(torch.isfinite(t).all() for t in sd.values() if t.is_floating_point())
    InternVLChatModel.from_pretrained(src)


@pytest.mark.parametrize("method,fmt", [("rtn", "gptq_v2"), ("gptq", "gptq")])
def test_weight_too_large_for_fp16_scales_is_named_before_work(tmp_path, method, fmt):
    model, tok = build_model("v1.2", seed=1)
    with torch.no_grad():
        model.get_parameter(POISONED).view(-1)[5] = 2.0e6  # finite, but its group's fp16 scale would overflow
    lm = runner.LoadedModel("internvl_chat", model, model.config.to_dict(), tok, None, "tiny")
    st = QuantSettings(method=method, bits=4, group_size=32, fmt=fmt, progress=False)
    rc = runner.RunConfig(settings=st, nsamples=2, seqlen=16, eval_windows=1, eval_images=1, max_calib_images=1,
                          mm_samples=0, out=str(tmp_path / "q"))
    with pytest.raises(runner.QuantizeError, match=r"fp16 scales.*language_model\.model\.layers\.1\.mlp\.down_proj"):
        runner.run(rc, lm, log=lambda *a, **k: None)
    assert not (tmp_path / "q").exists()
