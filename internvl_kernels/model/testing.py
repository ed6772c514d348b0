"""Small seeded checkpoint folders in the official InternVL layouts (no real InternVL weights exist offline).

``write_checkpoint(path, preset, seed)`` writes ``config.json`` (official field names), sharded safetensors + index
with the official keys, and a real (tiny, BPE) tokenizer with InternVL's special tokens. Presets keep the real
structure at tiny widths:

=======  ===========================  ==========  ============  ============================================
preset   ViT                          select      pixel-shuffle LLM
=======  ===========================  ==========  ============  ============================================
v1.1     6B-like, 6 blocks            -4          v1            Llama layout (LLaMA2-13B-like, MHA)
v1.2     6B-like, 5 blocks            -1          v1            Llama layout (Yi-34B-like, GQA)
v1.5     6B-like, 5 blocks            -1          v2            InternLM2 layout (packed GQA wqkv), dynamic res
=======  ===========================  ==========  ============  ============================================

InternVL2 / 2.5 / 3 presets (``FAMILY_PRESETS``), 300M-like or 6B-V2.5-like towers, pixel-shuffle v2, dynamic res:

==============  ==========  ==================================================================  ============
preset          ViT         LLM                                                                 template
==============  ==========  ==================================================================  ============
v2-phi3         300M-like   Phi3ForCausalLM (packed qkv_proj / gate_up_proj, longrope scaling)  phi3-chat
v2-internlm2    300M-like   InternLM2ForCausalLM (InternLM2-1.8B-like)                          internlm2-chat
v2.5-qwen2      300M-like   Qwen2ForCausalLM (qkv bias, GQA, tied embeddings: Qwen2.5-0.5B)     internvl2_5
v2.5-internlm2  6B-like     InternLM2ForCausalLM (InternLM2.5-20B-like, dynamic RoPE ×2)        internvl2_5
v3-qwen2-6b     6B-like     Qwen2ForCausalLM (Qwen2.5-32B-like: qkv bias, GQA, untied)          internvl2_5
==============  ==========  ==================================================================  ============

6B-like = RMSNorm, QK-RMSNorm over all channels, no qkv bias, layer scale; head_dim 64 (the kernels' D).
``write_vision_checkpoint(path, kind="6b"|"300m")`` writes a standalone InternViT folder (300M-like = LayerNorm,
qkv bias, no qk-norm).
"""
from __future__ import annotations

import json
import os

import torch

from .configuration import InternVisionConfig, InternVLChatConfig
from ..checkpoint.files import save_state_dict

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
PHI3_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]  # Phi-3's chat special tokens

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "InternVL is a vision language model that pairs InternViT with a large language model.",
    "Describe the image in detail. What is in the picture? A cat sits on a red chair near the window.",
    "An astronaut floats above the earth; a cup of coffee rests on a wooden table.",
    "Pixel shuffle merges each two by two neighbourhood of vision tokens into one token.",
    "Question: how many tiles does the image use? Answer: it uses six tiles and one thumbnail.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 448 1024 and punctuation , . ! ? : ; ( ) - \" '",
    "user assistant system hello world yes no image picture photo rocket camera coins moon page",
]

PRESETS = ("v1.1", "v1.2", "v1.5")
FAMILY_PRESETS = ("v2-phi3", "v2-internlm2", "v2.5-qwen2", "v2.5-internlm2", "v3-qwen2-6b")
ALL_PRESETS = PRESETS + FAMILY_PRESETS

# preset → (vision kind, ViT blocks, template)
_FAMILY = {
    "v2-phi3": ("300m", 4, "phi3-chat"),
    "v2-internlm2": ("300m", 4, "internlm2-chat"),
    "v2.5-qwen2": ("300m", 4, "internvl2_5"),
    "v2.5-internlm2": ("6b", 5, "internvl2_5"),
    "v3-qwen2-6b": ("6b", 5, "internvl2_5"),
}


def tiny_vision_config(kind: str = "6b", num_layers: int = 5, image_size: int = 56) -> InternVisionConfig:
    if kind == "6b":
        return InternVisionConfig(
            image_size=image_size, patch_size=14, hidden_size=128, num_attention_heads=2, intermediate_size=320,
            num_hidden_layers=num_layers, qkv_bias=False, qk_normalization=True, norm_type="rms_norm",
            layer_norm_eps=1e-6, initializer_factor=0.1,
        )
    if kind == "300m":
        return InternVisionConfig(
            image_size=image_size, patch_size=14, hidden_size=128, num_attention_heads=2, intermediate_size=320,
            num_hidden_layers=num_layers, qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
            layer_norm_eps=1e-6, initializer_factor=0.1,
        )
    raise ValueError(f"unknown vision kind {kind!r} (6b, 300m)")


def build_tokenizer(vocab_size: int = 384, extra_special: list[str] | tuple = ()):
    """A real byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with InternVL's special tokens
    (and ``extra_special``, e.g. Phi-3's chat tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", *extra_special],
    )
    return fast


def _llm_config(preset: str, vocab_size: int) -> dict:
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                  tie_word_embeddings=False, torch_dtype="float32")
    if preset == "v1.1":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=4,
                    num_key_value_heads=4, hidden_act="silu", rope_theta=10000.0, rope_scaling=None, **common)
    if preset == "v1.2":
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", num_attention_heads=4,
                    num_key_value_heads=2, hidden_act="silu", rope_theta=5000000.0, rope_scaling=None, **common)
    if preset == "v1.5":
        return dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", num_attention_heads=4,
                    num_key_value_heads=2, hidden_act="silu", rope_theta=1000000.0,
                    rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False, attn_implementation="eager",
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"}, **common)
    if preset == "v2-phi3":  # Phi-3-mini-128k: MHA, longrope (long/short factors per rotary frequency)
        hd = 64 // 4
        return dict(architectures=["Phi3ForCausalLM"], model_type="phi3", num_attention_heads=4, num_key_value_heads=4,
                    hidden_act="silu", rope_theta=10000.0, original_max_position_embeddings=128,
                    rope_scaling={"type": "longrope", "long_factor": [1.0 + 0.25 * i for i in range(hd // 2)],
                                  "short_factor": [1.0 + 0.05 * i for i in range(hd // 2)]},
                    attention_bias=False, sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                    attn_implementation="flash_attention_2", **common)
    if preset in ("v2-internlm2", "v2.5-internlm2"):  # InternLM2-chat-1.8B / InternLM2.5-20B-chat
        return dict(architectures=["InternLM2ForCausalLM"], model_type="internlm2", num_attention_heads=4,
                    num_key_value_heads=2, hidden_act="silu", rope_theta=1000000.0,
                    rope_scaling={"type": "dynamic", "factor": 2.0 if preset == "v2.5-internlm2" else 3.0}, bias=False,
                    attn_implementation="flash_attention_2",
                    auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config"}, **common)
    if preset in ("v2.5-qwen2", "v3-qwen2-6b"):  # Qwen2.5-0.5B-Instruct (tied) / Qwen2.5-32B-Instruct (untied)
        out = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_attention_heads=4,
                   num_key_value_heads=2 if preset == "v2.5-qwen2" else 1, hidden_act="silu", rope_theta=1000000.0,
                   rope_scaling=None, sliding_window=32768, use_sliding_window=False, max_window_layers=2,
                   attention_dropout=0.0, attn_implementation="flash_attention_2", **common)
        out["tie_word_embeddings"] = preset == "v2.5-qwen2"
        return out
    raise ValueError(f"unknown preset {preset!r}; choose one of {ALL_PRESETS}")


def chat_config(preset: str, vocab_size: int = 384) -> InternVLChatConfig:
    if preset in _FAMILY:
        kind, n, template = _FAMILY[preset]
        return InternVLChatConfig(
            vision_config=tiny_vision_config(kind, num_layers=n),
            llm_config=_llm_config(preset, vocab_size),
            select_layer=-1, force_image_size=56, downsample_ratio=0.5, template=template,
            dynamic_image_size=True, use_thumbnail=True, ps_version="v2", min_dynamic_patch=1,
            max_dynamic_patch=12 if preset.startswith(("v2.5", "v3")) else 6,
            extra={"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                   "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}, "torch_dtype": "float32",
                   "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0},
        )
    layers = {"v1.1": 6, "v1.2": 5, "v1.5": 5}
    if preset not in layers:
        raise ValueError(f"unknown preset {preset!r}; choose one of {ALL_PRESETS}")
    return InternVLChatConfig(
        vision_config=tiny_vision_config("6b", num_layers=layers[preset]),
        llm_config=_llm_config(preset, vocab_size),
        select_layer=-4 if preset == "v1.1" else -1,
        force_image_size=56,
        downsample_ratio=0.5,
        template={"v1.1": "vicuna_v1.1", "v1.2": "Hermes-2", "v1.5": "internlm2-chat"}[preset],
        dynamic_image_size=preset == "v1.5",
        use_thumbnail=preset == "v1.5",
        ps_version="v2" if preset == "v1.5" else "v1",
        min_dynamic_patch=1,
        max_dynamic_patch=6 if preset == "v1.5" else 1,
        extra={"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
               "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}, "torch_dtype": "float32"},
    )


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Seeded random init that exercises every parameter (no zeros, no ones): weights ~ N(0, std), norm weights
    ~ 1 + N(0, 0.1), layer scales ~ 0.1·(1 + N(0, 0.2)), biases ~ N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            shape = p.shape
            if leaf in ("ls1", "ls2"):
                val = 0.1 * (1 + 0.2 * torch.randn(shape, generator=g))
            elif p.dim() == 1 and leaf == "weight":  # norms
                val = 1 + 0.1 * torch.randn(shape, generator=g)
            elif leaf in ("class_embedding", "position_embedding"):
                val = 0.5 * torch.randn(shape, generator=g)
            elif leaf == "bias":
                val = std * torch.randn(shape, generator=g)
            elif p.dim() >= 2:
                fan_in = shape[1] * (shape[2] * shape[3] if p.dim() == 4 else 1)
                val = torch.randn(shape, generator=g) * max(std, fan_in**-0.5)
            else:
                val = std * torch.randn(shape, generator=g)
            p.copy_(val.to(p.dtype))


def build_model(preset: str, seed: int = 0, tokenizer=None):
    """An in-memory tiny :class:`InternVLChatModel` of ``preset`` with seeded weights (and its tokenizer)."""
    from .chat import InternVLChatModel

    tokenizer = tokenizer or build_tokenizer(extra_special=PHI3_TOKENS if preset == "v2-phi3" else ())
    cfg = chat_config(preset, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = InternVLChatModel(cfg)
    randomize_(model, seed)
    model.eval()
    return model, tokenizer


def write_checkpoint(path: str, preset: str = "v1.5", seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: int = 256 * 1024) -> str:
    """Write a tiny official-layout InternVL-Chat folder for ``preset`` (sharded, with index and tokenizer)."""
    model, tokenizer = build_model(preset, seed)
    model.to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size, tokenizer=tokenizer)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, f)
    return path


def write_vision_checkpoint(path: str, kind: str = "6b", seed: int = 0, num_layers: int = 3,
                            dtype: torch.dtype = torch.float32) -> str:
    """Write a tiny standalone InternViT folder (keys without ``vision_model.``), like InternViT-6B-448px-V1-x."""
    from .vision import InternVisionModel

    cfg = tiny_vision_config(kind, num_layers=num_layers)
    model = InternVisionModel(cfg)
    randomize_(model, seed)
    model.to(dtype)
    os.makedirs(path, exist_ok=True)
    d = cfg.to_dict()
    d["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2)
    save_state_dict(model.state_dict(), path, max_shard_size=max(64 * 1024, 1))
    return path


HF_IMAGE_TOKEN_ID = 7  # the image-context token of :func:`build_hf_internvl`'s vocabulary


def build_hf_internvl(kind: str = "6b", tie: bool = False, seed: int = 0, feature_layer: int = -1,
                      num_layers: int = 3, text_layers: int = 2):
    """transformers' own ``InternVLForConditionalGeneration`` (the "-hf" layout) at tiny widths with a Qwen2 text
    model, seeded like :func:`randomize_`: ``kind`` "6b" (RMSNorm, QK-norm, no qkv bias) or "300m" (LayerNorm,
    qkv bias); 56 px tiles → 4 image tokens per tile; image-context token id :data:`HF_IMAGE_TOKEN_ID`."""
    from transformers import Qwen2Config
    from transformers.models.internvl import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    if kind not in ("6b", "300m"):
        raise ValueError(f"unknown vision kind {kind!r} (6b, 300m)")
    vision = InternVLVisionConfig(
        hidden_size=128, num_attention_heads=2, intermediate_size=320, num_hidden_layers=num_layers,
        image_size=[56, 56], patch_size=[14, 14], norm_type="rms_norm" if kind == "6b" else "layer_norm",
        use_qk_norm=kind == "6b", attention_bias=kind == "300m", layer_norm_eps=1e-6, hidden_act="gelu",
        use_mean_pooling=True, layer_scale_init_value=0.1,
    )
    text = Qwen2Config(vocab_size=160, hidden_size=96, intermediate_size=200, num_hidden_layers=text_layers,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                       max_position_embeddings=1024, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       pad_token_id=3)
    cfg = InternVLConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=HF_IMAGE_TOKEN_ID,
                         downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="default", tie_word_embeddings=tie)
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(cfg).eval()
    randomize_(hf, seed=seed)
    if tie:
        hf.tie_weights()
    return hf
