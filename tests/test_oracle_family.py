"""External oracles for the InternVL2 / 2.5 / 3 family: transformers' own ``InternVLForConditionalGeneration``
(tiny Qwen2 text config, both vision-tower shapes) written in the official remote-code layout and loaded by
``InternVLChatModel.from_pretrained``; and transformers' ``Phi3ForCausalLM`` inside the chat model (InternVL2-4B)."""
from __future__ import annotations

import pytest
import torch

from internvl_kernels.model import IMG_CONTEXT_TOKEN, InternVLChatModel
from internvl_kernels.model.hf_interop import official_state_dict_from_hf, write_official_checkpoint_from_hf
from internvl_kernels.model.testing import HF_IMAGE_TOKEN_ID, build_hf_internvl, write_checkpoint

tf_internvl = pytest.importorskip("transformers.models.internvl")

IMG_ID = HF_IMAGE_TOKEN_ID


def _hf_model(kind: str, tie: bool, seed: int, feature_layer: int = -1):
    return build_hf_internvl(kind, tie=tie, seed=seed, feature_layer=feature_layer)


def _ids(tiles: int, seed: int):
    """Text tokens around ``tiles`` × 4 image-context slots (a 56 px tile: 4×4 patches → 2×2 after pixel-shuffle)."""
    text = torch.randint(8, 160, (1, 11), generator=torch.Generator().manual_seed(seed))
    return torch.cat([text[:, :5], torch.full((1, 4 * tiles), IMG_ID), text[:, 5:]], dim=1)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@torch.no_grad()
@pytest.mark.parametrize("kind,tie,layer", [("300m", True, -1), ("6b", False, -1), ("6b", True, -2)])
def test_official_layout_of_transformers_internvl_gives_the_same_logits(tmp_path, kind, tie, layer):
    hf = _hf_model(kind, tie, seed=11, feature_layer=layer)
    folder = write_official_checkpoint_from_hf(hf, str(tmp_path / "official"), max_shard_size=200_000)
    ours = InternVLChatModel.from_pretrained(folder, dtype=torch.float32)
    ours.img_context_token_id = IMG_ID
    assert type(ours.language_model).__name__ == "Qwen2ForCausalLM"
    assert ours.num_image_token == 4
    tiles = 3
    pv = torch.randn(tiles, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    ids = _ids(tiles, seed=1)
    ref_feats = hf.model.get_image_features(pixel_values=pv).pooler_output
    feats = ours.extract_feature(pv)
    assert not torch.isnan(feats).any()
    assert _rel(feats, ref_feats) <= 1e-5
    ref = hf(input_ids=ids, pixel_values=pv).logits
    got = ours(pixel_values=pv, input_ids=ids).logits
    assert got.shape == ref.shape and not torch.isnan(got).any()
    assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    # the official folder round-trips: our save_pretrained writes the same tensors under the same keys
    ours.save_pretrained(str(tmp_path / "again"), max_shard_size=200_000)
    again = InternVLChatModel.from_pretrained(str(tmp_path / "again"))
    assert set(again.official_state_dict()) == set(ours.official_state_dict())
    for k, v in ours.official_state_dict().items():
        assert torch.equal(again.official_state_dict()[k], v), k


def test_hf_key_mapping_covers_every_tensor():
    hf = _hf_model("6b", False, seed=2)
    sd = official_state_dict_from_hf(dict(hf.state_dict()), hf.config)
    n_hf = sum(t.numel() for t in hf.state_dict().values())
    assert sum(t.numel() for t in sd.values()) == n_hf
    assert sd["vision_model.encoder.layers.0.attn.qkv.weight"].shape == (384, 128)
    w = hf.state_dict()
    assert torch.equal(sd["vision_model.encoder.layers.1.attn.qkv.weight"][128:256],
                       w["model.vision_tower.encoder.layer.1.attention.k_proj.weight"])
    assert torch.equal(sd["mlp1.3.bias"], w["model.multi_modal_projector.linear_2.bias"])


@torch.no_grad()
def test_phi3_inside_the_chat_model_matches_transformers_phi3(tmp_path):
    from transformers import Phi3ForCausalLM

    folder = write_checkpoint(str(tmp_path / "phi3"), "v2-phi3", seed=4)
    model = InternVLChatModel.from_pretrained(folder)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    # an independent Phi3ForCausalLM from the folder's own llm_config and language_model.* tensors
    from internvl_kernels.model.chat import llm_config_to_hf
    from internvl_kernels.checkpoint.files import load_state_dict, strip_prefix

    ref = Phi3ForCausalLM(llm_config_to_hf(model.config.llm_config)).eval()
    llm_sd = strip_prefix(load_state_dict(folder), "language_model.")
    assert "model.layers.0.self_attn.qkv_proj.weight" in llm_sd and "model.layers.0.mlp.gate_up_proj.weight" in llm_sd
    missing, unexpected = ref.load_state_dict(llm_sd, strict=False)
    assert not unexpected and all("inv_freq" in m for m in missing)
    pv = torch.randn(2, 3, 56, 56)
    # a prompt longer than original_max_position_embeddings (128): longrope switches to the long factors
    text = ("<img>" + IMG_CONTEXT_TOKEN * model.num_image_token * 2 + "</img>\n"
            + "Describe the image in detail. " * 20)
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 128
    feats = model.extract_feature(pv)
    embeds = ref.get_input_embeddings()(ids).clone()
    embeds[ids == model.img_context_token_id] = feats.reshape(-1, feats.shape[-1])
    want = ref(inputs_embeds=embeds).logits
    got = model(pixel_values=pv, input_ids=ids).logits
    assert not torch.isnan(got).any()
    assert _rel(got, want) <= 1e-5
    # and on the short prompt (short factors)
    short = ids[:, :40]
    assert _rel(model(input_ids=short).logits, ref(input_ids=short).logits) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("T", [12, 40])
def test_internlm2_dynamic_ntk_rope_matches_its_equations(T):
    """InternLM2 / 2.5 configs ship ``rope_scaling: {type: dynamic, factor}``: past max_position_embeddings the base
    becomes ``base·(factor·T/max_pos − (factor − 1))^(d/(d−2))`` (InternLM2's DynamicNTKScalingRotaryEmbedding); the
    converted Llama must follow it (T=12: unscaled, T=40 > max_pos=16: scaled)."""
    from test_oracle_transformers import _internlm2_forward
    from transformers import LlamaForCausalLM

    from internvl_kernels.model.chat import llama_config_from_llm_config
    from internvl_kernels.checkpoint.internlm2 import llama_to_internlm2_state_dict
    from internvl_kernels.model.testing import randomize_

    cfg = dict(architectures=["InternLM2ForCausalLM"], vocab_size=101, hidden_size=64, intermediate_size=160,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
               rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
               max_position_embeddings=16)
    llama = LlamaForCausalLM(llama_config_from_llm_config(cfg)).eval()
    llama.config._attn_implementation = "eager"
    randomize_(llama, seed=5, std=0.1)
    sd = llama_to_internlm2_state_dict(dict(llama.state_dict()), cfg)
    ids = torch.randint(0, 101, (1, T), generator=torch.Generator().manual_seed(T))
    hd, f, mp = 16, 2.0, 16
    base = 10000.0 if T <= mp else 10000.0 * ((f * T / mp) - (f - 1)) ** (hd / (hd - 2))
    ref = _internlm2_forward(sd, {**cfg, "rope_theta": base}, ids)
    got = llama(ids).logits
    assert _rel(got, ref) <= 1e-5, _rel(got, ref)
    if T > mp:  # and the scaling really mattered
        assert _rel(_internlm2_forward(sd, cfg, ids), ref) > 1e-3


def test_hf_configs_without_an_official_counterpart_are_refused():
    from internvl_kernels.model.configuration import UnsupportedConfigError
    from internvl_kernels.model.hf_interop import official_config_from_hf

    hf = _hf_model("300m", True, seed=1)
    hf.config.vision_feature_select_strategy = "full"
    with pytest.raises(UnsupportedConfigError, match="vision_feature_select_strategy"):
        official_config_from_hf(hf.config)
    hf.config.vision_feature_select_strategy = "default"
    hf.config.vision_feature_layer = [-1, -2]
    with pytest.raises(UnsupportedConfigError, match="vision_feature_layer"):
        official_config_from_hf(hf.config)
