"""Model-side bad input: a missing / invalid ``config.json`` names its path; wrong config value types and zero head
counts name the field; the eager pixel-shuffle op handles a single output token; a tile size other than the model's
image size is refused with the ``input_size=`` hint."""
import json
import os

import numpy as np
import pytest
import torch

import internvl_kernels
from internvl_kernels.model import (CheckpointError, InternVisionModel, InternVLChatConfig, InternVLChatModel,
                                    load_image)
from internvl_kernels.model import functional as F_ref
from internvl_kernels.model.configuration import UnsupportedConfigError
from internvl_kernels.model.testing import build_model, write_checkpoint
from internvl_kernels.ops import pixel_shuffle
from internvl_kernels.model import load_quantized_llm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("errs") / "v1_2"), "v1.2", seed=1)


@pytest.mark.parametrize("loader", [InternVLChatModel.from_pretrained, InternVisionModel.from_pretrained,
                                    load_quantized_llm])
@pytest.mark.parametrize("content,msg", [(None, "config file not found"), ("{not json", "not valid JSON"),
                                         (b"\xff\xfe\x00garbage", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_config_json_errors_name_the_path(tmp_path, loader, content, msg):
    d = tmp_path / "ck"
    d.mkdir()
    cfg = d / "config.json"
    if isinstance(content, bytes):
        cfg.write_bytes(content)
    elif content is not None:
        cfg.write_text(content)
    with pytest.raises(CheckpointError, match=msg) as e:
        loader(str(d))
    assert str(cfg) in str(e.value)


@pytest.mark.parametrize("edit,field", [
    (lambda c: c.update(select_layer="-1"), "select_layer"),
    (lambda c: c.update(select_layer=1.5), "select_layer"),
    (lambda c: c["vision_config"].update(num_attention_heads=0), "vision_config.num_attention_heads"),
    (lambda c: c["vision_config"].update(hidden_size="128"), "vision_config.hidden_size"),
    (lambda c: c["vision_config"].update(patch_size=0), "vision_config.patch_size"),
    (lambda c: c["llm_config"].update(num_attention_heads=0), "llm_config.num_attention_heads"),
    (lambda c: c["llm_config"].update(num_key_value_heads=0), "llm_config.num_key_value_heads"),
    (lambda c: c["llm_config"].update(num_key_value_heads=3), "num_key_value_heads=3"),
    (lambda c: c["llm_config"].update(hidden_size=None), "llm_config.hidden_size"),
    (lambda c: c.update(downsample_ratio="0.5"), "downsample_ratio"),
    (lambda c: c.update(dynamic_image_size="yes"), "dynamic_image_size"),
    (lambda c: c.update(max_dynamic_patch=0), "max_dynamic_patch"),
])
def test_bad_config_values_name_the_field(folder, tmp_path, edit, field):
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    edit(cfg)
    with pytest.raises(UnsupportedConfigError, match=field.replace(".", r"\.")):
        InternVLChatConfig.from_dict(cfg)
    d = tmp_path / "bad"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError, match=field.replace(".", r"\.")):
        InternVLChatModel.from_pretrained(str(d))


def test_good_config_still_loads(folder):
    m = InternVLChatModel.from_pretrained(folder)
    assert m.config.select_layer == -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,scale", [((1, 4, 8), 0.5), ((3, 4, 6), 0.5), ((2, 16, 8), 0.25), ((1, 1, 5), 1.0)])
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_shuffle_single_output_token(shape, scale, version, dtype):
    x = torch.randn(*shape).to(dtype)
    ref = F_ref.pixel_shuffle(x, scale, version)
    with internvl_kernels.backend("eager"):
        y = pixel_shuffle(x, scale, version)
    assert y.shape == ref.shape and y.shape[1] == 1
    assert torch.equal(y, ref)
    assert y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a fresh tensor, not a view of x


def test_tile_size_mismatch_says_input_size(folder):
    model, _ = build_model("v1.2", seed=0)
    img = (np.random.default_rng(0).random((120, 90, 3)) * 255).astype(np.uint8)
    big = load_image(img, dynamic=False)  # the default 448 px tile
    with pytest.raises(ValueError, match=r"input_size=56"):
        model.extract_feature(big)
    ok = load_image(img, input_size=56, dynamic=False)
    assert model.extract_feature(ok).shape == (1, model.num_image_token, model.config.llm_config["hidden_size"])
