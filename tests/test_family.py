"""InternVL2 / 2.5 / 3 official-layout folders (Phi-3, InternLM2 / 2.5, Qwen2 / 2.5 LLMs; 300M and 6B-V2.5 towers):
config fields, loading, save round-trip, templates, chat, patching."""
from __future__ import annotations

import json
import os

import pytest
import torch
from _kernel_utils import assert_close
from transformers import AutoTokenizer

from internvl_kernels import ops, patch_model, set_backend, unpatch_model
from internvl_kernels.model import IMG_CONTEXT_TOKEN, InternVisionConfig, InternVisionModel, InternVLChatModel
from internvl_kernels.model.configuration import InternVLChatConfig, UnsupportedConfigError
from internvl_kernels.model.conversation import get_conv_template
from internvl_kernels.checkpoint.files import load_state_dict
from internvl_kernels.model.testing import FAMILY_PRESETS, write_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

LLM_CLASS = {"v2-phi3": "Phi3ForCausalLM", "v2-internlm2": "LlamaForCausalLM", "v2.5-qwen2": "Qwen2ForCausalLM",
             "v2.5-internlm2": "LlamaForCausalLM", "v3-qwen2-6b": "Qwen2ForCausalLM"}

# vision_config fields as published for InternViT-300M-448px-V2_5 (InternVL2.5 / InternVL3 1B..14B; InternVL3
# carries the switched-off MoE fields too) and InternViT-6B-448px-V2_5 (InternVL2.5-26B..78B, InternVL3-38B / 78B)
VIT_300M_V25 = {
    "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.1, "dropout": 0.0,
    "hidden_act": "gelu", "hidden_size": 1024, "image_size": 448, "initializer_factor": 0.1,
    "initializer_range": 1e-10, "intermediate_size": 4096, "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b",
    "norm_type": "layer_norm", "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
    "patch_size": 14, "qk_normalization": False, "qkv_bias": True, "torch_dtype": "bfloat16", "use_flash_attn": True,
    "capacity_factor": 1.2, "eval_capacity_factor": 1.4, "moe_coeff_ratio": 0.5, "moe_intermediate_size": 768,
    "num_experts": 8, "num_routed_experts": 4, "num_shared_experts": 4, "use_moe": False, "use_residual": True,
    "use_rts": False, "use_weighted_residual": False,
}
VIT_6B_V25 = {
    "architectures": ["InternVisionModel"], "attention_dropout": 0.0, "drop_path_rate": 0.4, "dropout": 0.0,
    "hidden_act": "gelu", "hidden_size": 3200, "image_size": 448, "initializer_factor": 0.1,
    "initializer_range": 1e-10, "intermediate_size": 12800, "layer_norm_eps": 1e-06, "model_type": "intern_vit_6b",
    "norm_type": "rms_norm", "num_attention_heads": 25, "num_channels": 3, "num_hidden_layers": 45, "patch_size": 14,
    "qk_normalization": True, "qkv_bias": False, "torch_dtype": "bfloat16", "use_flash_attn": True,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=7) for p in FAMILY_PRESETS}


def _expected_params(f):
    """InternViT's parameter count written out from the architecture (published: ~0.3B and ~5.5B)."""
    C, I, P = f["hidden_size"], f["intermediate_size"], f["patch_size"]
    norm = 2 * C if f["norm_type"] == "layer_norm" else C
    layer = (3 * C * C + (3 * C if f["qkv_bias"] else 0) + C * C + C + C * I + I + I * C + C + 2 * norm + 2 * C
             + (2 * C if f["qk_normalization"] else 0))
    tokens = (f["image_size"] // P) ** 2 + 1
    return f["num_hidden_layers"] * layer + 3 * P * P * C + C + C + tokens * C


@pytest.mark.parametrize("fields,blocks", [(VIT_300M_V25, 24), (VIT_6B_V25, 45)])
def test_v25_vision_tower_configs(fields, blocks):
    params = _expected_params(fields)
    assert 0.29e9 < params < 0.31e9 if blocks == 24 else 5.4e9 < params < 5.6e9
    cfg = InternVisionConfig.from_dict(fields)
    with torch.device("meta"):
        vit = InternVisionModel(cfg)
    assert len(vit.encoder.layers) == blocks
    assert sum(p.numel() for p in vit.parameters()) == params
    layer = vit.encoder.layers[0]
    assert (layer.attn.qkv.bias is not None) == fields["qkv_bias"]
    assert hasattr(layer.attn, "q_norm") == fields["qk_normalization"]
    assert isinstance(layer.norm1, torch.nn.LayerNorm) == (fields["norm_type"] == "layer_norm")
    back = cfg.to_dict()
    assert all(back[k] == v for k, v in fields.items())  # unknown fields written back unchanged
    with pytest.raises(UnsupportedConfigError, match="use_moe"):
        InternVisionConfig.from_dict({**fields, "use_moe": True})


def test_unknown_llm_names_the_supported_ones(folders):
    with open(os.path.join(folders["v2.5-qwen2"], "config.json")) as f:
        raw = json.load(f)
    raw["llm_config"]["architectures"] = ["InternLM3ForCausalLM"]
    with pytest.raises(UnsupportedConfigError) as e:
        InternVLChatConfig.from_dict(raw)
    for name in ("LlamaForCausalLM", "InternLM2ForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM", "InternLM3"):
        assert name in str(e.value)


@torch.no_grad()
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_family_folder_loads_and_round_trips(folders, preset, tmp_path):
    folder = folders[preset]
    model = InternVLChatModel.from_pretrained(folder)
    assert type(model.language_model).__name__ == LLM_CLASS[preset]
    cfg = model.config
    assert (cfg.ps_version, cfg.select_layer, cfg.dynamic_image_size, cfg.use_thumbnail) == ("v2", -1, True, True)
    on_disk = load_state_dict(folder)
    ours = model.official_state_dict()
    assert set(ours) == set(on_disk)  # the official key layout, nothing missing, nothing extra
    for k, v in on_disk.items():
        assert torch.equal(ours[k], v), k
    if preset == "v2-phi3":
        assert "language_model.model.layers.0.self_attn.qkv_proj.weight" in on_disk
        assert "language_model.model.layers.0.mlp.gate_up_proj.weight" in on_disk
    if "qwen2" in preset:
        assert "language_model.model.layers.0.self_attn.q_proj.bias" in on_disk
        assert ("language_model.lm_head.weight" in on_disk) == (preset != "v2.5-qwen2")  # Qwen2.5-0.5B ties
    if "internlm2" in preset:
        assert "language_model.model.layers.0.attention.wqkv.weight" in on_disk
        rope = model.language_model.config.rope_parameters
        assert rope["rope_type"] == "dynamic" and rope["factor"] == cfg.llm_config["rope_scaling"]["factor"]
    model.save_pretrained(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "config.json") as f:
        saved = json.load(f)
    with open(os.path.join(folder, "config.json")) as f:
        orig = json.load(f)
    assert saved["llm_config"] == orig["llm_config"] and saved["vision_config"] == orig["vision_config"]
    again = InternVLChatModel.from_pretrained(str(tmp_path / "saved"))
    pv = torch.randn(1, 3, 56, 56)
    assert torch.equal(again.extract_feature(pv), model.extract_feature(pv))
    ids = torch.randint(10, 300, (1, 12))
    assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


def _turns(name):
    t = get_conv_template(name)
    t.system_message = "SYS"
    t.append_message(t.roles[0], "Q1")
    t.append_message(t.roles[1], "A1")
    t.append_message(t.roles[0], "Q2")
    t.append_message(t.roles[1], None)
    return t


@pytest.mark.parametrize("name,prompt,stop", [
    ("internvl2_5", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1"
                    "<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>"),
    ("Hermes-2", "<|im_start|>system\nSYS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1<|im_end|>"
                 "<|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n", "<|im_end|>"),
    ("internlm2-chat", "<|im_start|>system\nSYS<|im_end|><|im_start|>user\nQ1<|im_end|><|im_start|>assistant\nA1"
                       "<|im_end|><|im_start|>user\nQ2<|im_end|><|im_start|>assistant\n", "<|im_end|>"),
    ("phi3-chat", "<|system|>\nSYS<|end|><|user|>\nQ1<|end|><|assistant|>\nA1<|end|><|user|>\nQ2<|end|>"
                  "<|assistant|>\n", "<|end|>"),
])
def test_templates_follow_the_official_semantics(name, prompt, stop):
    t = _turns(name)
    assert t.get_prompt() == prompt
    assert t.stop_strings == [stop]


@torch.no_grad()
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_family_chat_prompt_and_answer(folders, preset):
    model = InternVLChatModel.from_pretrained(folders[preset])
    tok = AutoTokenizer.from_pretrained(folders[preset])
    pv = torch.randn(2, 3, 56, 56)
    seen = {}
    real_call = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **kw):
            seen["text"] = text
            return real_call(self, text, *a, **kw)

    tok.__class__ = Spy
    gen = dict(max_new_tokens=6, do_sample=False)
    answer, history = model.chat(tok, pv, "What is in the picture?", gen, return_history=True)
    tok.__class__ = Spy.__mro__[1]
    template = get_conv_template(model.config.template)
    assert seen["text"].startswith(template.system_template.format(system_message=template.system_message))
    assert seen["text"].count(IMG_CONTEXT_TOKEN) == 2 * model.num_image_token
    assert seen["text"].endswith(template.roles[1])
    assert isinstance(answer, str) and history == [("<image>\nWhat is in the picture?", answer)]
    # the answer is the greedy continuation of exactly that prompt
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    ids = tok(seen["text"], return_tensors="pt")["input_ids"]
    stop = [tok.convert_tokens_to_ids(s) for s in template.stop_strings] + [tok.eos_token_id]
    out = model.generate(pixel_values=pv, input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=stop,
                         pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0], skip_special_tokens=True)
    for s in template.stop_strings:
        text = text.split(s)[0]
    assert text.strip() == answer


def test_load_image_uses_the_config_tiling(folders):
    import numpy as np

    model = InternVLChatModel.from_pretrained(folders["v2.5-qwen2"])
    wide = (np.random.default_rng(0).random((56, 170, 3)) * 255).astype("uint8")  # ~3:1 → 3 tiles + thumbnail
    pv = model.load_image(wide)
    assert pv.shape == (4, 3, 56, 56)
    model.config.dynamic_image_size = False
    assert model.load_image(wide).shape == (1, 3, 56, 56)
    model.config.dynamic_image_size, model.config.max_dynamic_patch = True, 2
    assert model.load_image(wide).shape == (3, 3, 56, 56)  # 2 tiles + thumbnail


@torch.no_grad()
@pytest.mark.parametrize("preset", FAMILY_PRESETS)
def test_family_patched_matches_eager(folders, preset, device):
    model = InternVLChatModel.from_pretrained(folders[preset], device=device)
    tok = AutoTokenizer.from_pretrained(folders[preset])
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    pv = torch.randn(1, 3, 56, 56, device=device)
    text = "<img>" + IMG_CONTEXT_TOKEN * model.num_image_token + "</img>\nWhat is in the image?"
    ids = tok(text, return_tensors="pt")["input_ids"].to(device)
    feats = model.extract_feature(pv)
    logits = model(pixel_values=pv, input_ids=ids).logits
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    greedy = model.generate(pixel_values=pv, input_ids=ids, **kw)
    patch_model(model)
    six_b = model.config.vision_config.qk_normalization
    names = ("add_rms_norm", "qk_norm_attention") if six_b else ("add_layer_norm", "attention")
    names += ("pixel_shuffle_layer_norm", "rms_norm")
    before = {n: ops.launches(n) for n in names}
    with set_backend("triton"):
        feats_k = model.extract_feature(pv)
        logits_k = model(pixel_values=pv, input_ids=ids).logits
        greedy_k = model.generate(pixel_values=pv, input_ids=ids, **kw)
    assert all(ops.launches(n) > before[n] for n in names)
    assert_close(feats_k, feats, rtol=1e-4, atol=1e-5, what="image features")
    assert_close(logits_k, logits, rtol=1e-4, atol=1e-4, what="logits")
    assert torch.equal(greedy_k, greedy)
    unpatch_model(model)
    assert torch.equal(model(pixel_values=pv, input_ids=ids).logits, logits)


def test_llm_config_conversion_of_published_fields():
    from internvl_kernels.model.chat import llm_config_to_hf

    # InternVL2-4B's Phi-3-mini-128k llm_config: "su" long-context scaling, original_max at the top level,
    # flash-attention requested by the remote code (not honoured here: transformers picks its own backend)
    phi3 = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064, hidden_size=96,
                intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                max_position_embeddings=131072, original_max_position_embeddings=4096, rope_theta=10000.0,
                rope_scaling={"type": "su", "long_factor": [1.5] * 12, "short_factor": [1.0] * 12},
                pad_token_id=32000, attn_implementation="flash_attention_2",
                auto_map={"AutoConfig": "configuration_phi3.Phi3Config"})
    c = llm_config_to_hf(phi3)
    assert type(c).__name__ == "Phi3Config" and c.rope_parameters["rope_type"] == "longrope"
    assert c.rope_parameters["original_max_position_embeddings"] == 4096
    assert c._attn_implementation != "flash_attention_2"
    # InternVL2.5-1B's Qwen2.5-0.5B-Instruct llm_config
    qwen = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151674, hidden_size=896,
                intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                rope_theta=1000000.0, rope_scaling=None, sliding_window=32768, use_sliding_window=False,
                max_window_layers=21, tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=151643,
                eos_token_id=151645, attn_implementation="flash_attention_2")
    q = llm_config_to_hf(qwen)
    assert type(q).__name__ == "Qwen2Config" and q.tie_word_embeddings and q.num_key_value_heads == 2
    assert q.rope_parameters["rope_theta"] == 1e6 and q._attn_implementation != "flash_attention_2"
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in Qwen2ForCausalLM(q).parameters() if p is not None)
    assert 0.45e9 < n < 0.65e9  # Qwen2.5-0.5B (tied: the embedding counted once)
    with pytest.raises(UnsupportedConfigError, match="Qwen2ForCausalLM"):
        llm_config_to_hf({**qwen, "architectures": ["GemmaForCausalLM"]})
