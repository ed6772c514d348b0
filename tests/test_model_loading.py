"""Loading the official checkpoint layouts: every preset, standalone InternViT, and clear errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from internvl_kernels.model import (
    CheckpointError,
    InternVisionModel,
    InternVLChatModel,
    UnsupportedConfigError,
    load_state_dict,
)
from internvl_kernels.model.testing import PRESETS, build_model, write_checkpoint, write_vision_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=0) for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_folder_has_official_layout(checkpoints, preset):
    path = checkpoints[preset]
    files = set(os.listdir(path))
    assert "model.safetensors.index.json" in files and "config.json" in files and "tokenizer.json" in files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and all(f.startswith("model-") and "-of-" in f for f in shards)
    cfg = json.load(open(os.path.join(path, "config.json")))
    assert cfg["architectures"] == ["InternVLChatModel"]
    assert cfg["ps_version"] == ("v2" if preset == "v1.5" else "v1")
    assert cfg["select_layer"] == (-4 if preset == "v1.1" else -1)
    keys = set(load_state_dict(path))
    for k in ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
              "vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.attn.qkv.weight",
              "vision_model.encoder.layers.0.attn.q_norm.weight", "vision_model.encoder.layers.0.ls1",
              "mlp1.0.weight", "mlp1.1.weight", "mlp1.3.bias"):
        assert k in keys, k
    assert "vision_model.encoder.layers.0.attn.qkv.bias" not in keys  # 6B: no qkv bias
    if preset == "v1.5":
        assert cfg["llm_config"]["architectures"] == ["InternLM2ForCausalLM"]
        assert "language_model.model.layers.0.attention.wqkv.weight" in keys
        assert "language_model.output.weight" in keys and "language_model.model.tok_embeddings.weight" in keys
        assert "language_model.model.layers.0.feed_forward.w1.weight" in keys
    else:
        assert "language_model.model.layers.0.self_attn.q_proj.weight" in keys
        assert "language_model.lm_head.weight" in keys


@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_reproduces_the_written_model(checkpoints, preset):
    ref, tok = build_model(preset, seed=0)
    model = InternVLChatModel.from_pretrained(checkpoints[preset])
    pv = torch.randn(3, 3, 56, 56)
    ids = torch.randint(0, len(tok), (1, 9))
    with torch.no_grad():
        assert torch.equal(model.extract_feature(pv), ref.extract_feature(pv))
        assert torch.equal(model.language_model(ids).logits, ref.language_model(ids).logits)
    assert model.num_image_token == 4
    assert not any(b.is_meta for b in model.buffers()) and not any(p.is_meta for p in model.parameters())


def test_from_pretrained_bf16(checkpoints):
    model = InternVLChatModel.from_pretrained(checkpoints["v1.5"], dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    f = model.extract_feature(torch.randn(1, 3, 56, 56))
    assert f.dtype == torch.bfloat16 and torch.isfinite(f).all()


def test_save_roundtrip_is_byte_exact(checkpoints, tmp_path):
    src = checkpoints["v1.5"]
    model = InternVLChatModel.from_pretrained(src)
    model.save_pretrained(str(tmp_path / "re"))
    a, b = load_state_dict(src), load_state_dict(str(tmp_path / "re"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["6b", "300m"])
def test_standalone_internvit(tmp_path, kind):
    path = write_vision_checkpoint(str(tmp_path / kind), kind=kind, seed=3)
    keys = set(load_state_dict(path))
    assert "embeddings.class_embedding" in keys and not any(k.startswith("vision_model.") for k in keys)
    assert ("encoder.layers.0.attn.qkv.bias" in keys) == (kind == "300m")
    assert ("encoder.layers.0.attn.q_norm.weight" in keys) == (kind == "6b")
    m = InternVisionModel.from_pretrained(path)
    pv = torch.randn(2, 3, 56, 56)
    out = m(pv, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 17, 128)  # cls + 4×4 patches
    assert len(out.hidden_states) == 4 and torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert torch.equal(m.forward_features(pv, layer=2), out.hidden_states[2])
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    m16 = InternVisionModel.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters())
    assert (m16(pv.bfloat16()).last_hidden_state.float() - out.last_hidden_state).abs().max() < 0.25


def test_select_layer_minus_4_is_block_output(checkpoints):
    """V1.1 uses hidden_states[-4]: the output of block n-3 of n (computed without running the last blocks)."""
    model = InternVLChatModel.from_pretrained(checkpoints["v1.1"])
    pv = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        full = model.vision_model(pv, output_hidden_states=True).hidden_states
        n = len(model.vision_model.encoder.layers)
        assert n == 6 and model.select_layer == -4
        feats = model.extract_feature(pv)
        expect = model.pixel_shuffle_and_project(full[n - 3][:, 1:])
        assert torch.equal(feats, expect)
        assert not torch.equal(feats, model.pixel_shuffle_and_project(full[-1][:, 1:]))


def test_position_embedding_interpolates_for_other_sizes(checkpoints):
    model = InternVLChatModel.from_pretrained(checkpoints["v1.2"])
    out = model.vision_model(torch.randn(1, 3, 84, 84))  # 6×6 grid from a 4×4 table
    assert out.last_hidden_state.shape == (1, 37, 128) and torch.isfinite(out.last_hidden_state).all()


# --- errors ------------------------------------------------------------------------------------------------------
def _copy(src, tmp_path):
    dst = str(tmp_path / "c")
    shutil.copytree(src, dst)
    return dst


def _edit_shard(path, fn):
    idx = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    shard = idx["weight_map"]["mlp1.1.weight"]
    sd = load_file(os.path.join(path, shard))
    fn(sd, idx)
    save_file(sd, os.path.join(path, shard), metadata={"format": "pt"})
    json.dump(idx, open(os.path.join(path, "model.safetensors.index.json"), "w"))


def test_missing_key_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.2"], tmp_path)

    def drop(sd, idx):
        del sd["mlp1.1.weight"]
        del idx["weight_map"]["mlp1.1.weight"]

    _edit_shard(path, drop)
    with pytest.raises(CheckpointError, match=r"missing keys.*1\.weight"):
        InternVLChatModel.from_pretrained(path)


def test_unexpected_key_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.2"], tmp_path)
    _edit_shard(path, lambda sd, idx: sd.__setitem__("mlp1.7.weight", torch.ones(2)) or
                idx["weight_map"].__setitem__("mlp1.7.weight", idx["weight_map"]["mlp1.1.weight"]))
    with pytest.raises(CheckpointError, match=r"unexpected keys.*7\.weight"):
        InternVLChatModel.from_pretrained(path)


def test_shape_mismatch_is_named(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.2"], tmp_path)
    _edit_shard(path, lambda sd, idx: sd.__setitem__("mlp1.1.weight", torch.randn(3, 5)))
    with pytest.raises(CheckpointError, match=r"shape mismatch.*1\.weight.*\(3, 5\)"):
        InternVLChatModel.from_pretrained(path)


def test_missing_shard_and_corrupt_file(checkpoints, tmp_path):
    path = _copy(checkpoints["v1.5"], tmp_path)
    shard = sorted(f for f in os.listdir(path) if f.startswith("model-"))[0]
    with open(os.path.join(path, shard), "wb") as f:
        f.write(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        InternVLChatModel.from_pretrained(path)
    os.remove(os.path.join(path, shard))
    with pytest.raises(CheckpointError, match="missing"):
        InternVLChatModel.from_pretrained(path)


def test_missing_folder_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        InternVLChatModel.from_pretrained(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    json.dump({"vision_config": {}, "llm_config": {"architectures": ["LlamaForCausalLM"]}},
              open(tmp_path / "empty" / "config.json", "w"))
    with pytest.raises(CheckpointError, match="no weights found"):
        InternVLChatModel.from_pretrained(str(tmp_path / "empty"))


@pytest.mark.parametrize("edit, msg", [
    (lambda c: c["vision_config"].__setitem__("norm_type", "batch_norm"), "norm_type"),
    (lambda c: c["vision_config"].__setitem__("hidden_act", "relu"), "hidden_act"),
    (lambda c: c.__setitem__("ps_version", "v3"), "ps_version"),
    (lambda c: c["llm_config"].__setitem__("architectures", ["InternLM3ForCausalLM"]), "InternLM3ForCausalLM"),
    (lambda c: c.__setitem__("downsample_ratio", 0.4), "downsample_ratio"),
    (lambda c: c.pop("llm_config"), "llm_config"),
])
def test_unsupported_config_is_named(checkpoints, tmp_path, edit, msg):
    path = _copy(checkpoints["v1.5"], tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    edit(cfg)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(UnsupportedConfigError, match=msg):
        InternVLChatModel.from_pretrained(path)


def test_bad_pixel_values_are_named(checkpoints):
    model = InternVLChatModel.from_pretrained(checkpoints["v1.2"])
    with pytest.raises(ValueError, match=r"pixel_values must be \[batch, 3, H, W\]"):
        model.extract_feature(torch.randn(3, 56, 56))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model.extract_feature(torch.randn(1, 3, 50, 56))
