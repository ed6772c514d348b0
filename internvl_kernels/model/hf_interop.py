"""transformers' own InternVL (``InternVLForConditionalGeneration``, the "-hf" checkpoints) ⇄ the official
remote-code layout that :class:`~internvl_kernels.model.InternVLChatModel` loads.

Key mapping (``hf`` → official):

=================================================================  ===============================================
``model.vision_tower.embeddings.cls_token``                         ``vision_model.embeddings.class_embedding``
``model.vision_tower.embeddings.position_embeddings``               ``vision_model.embeddings.position_embedding``
``model.vision_tower.embeddings.patch_embeddings.projection.*``     ``vision_model.embeddings.patch_embedding.*``
``...encoder.layer.N.attention.{q,k,v}_proj.*``                     ``...encoder.layers.N.attn.qkv.*`` (rows q, k, v)
``...attention.{q,k}_norm.weight`` / ``attention.projection_layer`` ``attn.{q,k}_norm.weight`` / ``attn.proj``
``...layernorm_before`` / ``layernorm_after`` / ``lambda_1`` / ``2``  ``norm1`` / ``norm2`` / ``ls1`` / ``ls2``
``model.multi_modal_projector.{layer_norm, linear_1, linear_2}``    ``mlp1.{0, 1, 3}``
``model.language_model.*`` / ``lm_head.weight``                     ``language_model.model.*`` / ``language_model.lm_head.weight``
=================================================================  ===============================================

transformers' QK-norm uses a fixed eps of 1e-6 (the official tower uses ``layer_norm_eps``, 1e-6 in every release).
"""
from __future__ import annotations

import json
import os
import re

import torch

from .configuration import UnsupportedConfigError
from ..checkpoint.files import save_state_dict

_VISION_RENAMES = [
    (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
    (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^encoder\.layer\.(\d+)\.attention\.q_norm\.", r"encoder.layers.\1.attn.q_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.k_norm\.", r"encoder.layers.\1.attn.k_norm."),
    (r"^encoder\.layer\.(\d+)\.attention\.projection_layer\.", r"encoder.layers.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"encoder.layers.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"encoder.layers.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.lambda_1$", r"encoder.layers.\1.ls1"),
    (r"^encoder\.layer\.(\d+)\.lambda_2$", r"encoder.layers.\1.ls2"),
]
_PROJECTOR = {"layer_norm": "0", "linear_1": "1", "linear_2": "3"}


def official_config_from_hf(hf_config) -> dict:
    """An ``InternVLConfig`` (transformers) → the official ``config.json`` dict (``InternVLChatConfig`` fields)."""
    v, t = hf_config.vision_config, hf_config.text_config
    if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
        raise UnsupportedConfigError("vision_feature_select_strategy must be 'default' (the official model drops the "
                                     f"cls token), got {hf_config.vision_feature_select_strategy!r}")
    layer = hf_config.vision_feature_layer
    if not isinstance(layer, int):
        raise UnsupportedConfigError(f"vision_feature_layer must be one int, got {layer!r}")
    if getattr(v, "use_mean_pooling", True) is False:
        raise UnsupportedConfigError("use_mean_pooling=False adds a final LayerNorm the official tower does not have")
    image = v.image_size[0] if isinstance(v.image_size, (list, tuple)) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (list, tuple)) else v.patch_size
    text = t.to_dict()
    arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "phi3": "Phi3ForCausalLM"}.get(t.model_type)
    if arch is None:
        raise UnsupportedConfigError(f"text_config.model_type={t.model_type!r}: supported are qwen2, llama, phi3")
    text["architectures"] = [arch]
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "num_channels": v.num_channels,
            "patch_size": patch, "image_size": image, "qkv_bias": bool(v.attention_bias),
            "hidden_size": v.hidden_size, "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size, "qk_normalization": bool(v.use_qk_norm),
            "num_hidden_layers": v.num_hidden_layers, "hidden_act": v.hidden_act, "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps, "initializer_factor": v.layer_scale_init_value,
        },
        "llm_config": text,
        "select_layer": layer, "force_image_size": image, "downsample_ratio": hf_config.downsample_ratio,
        "template": "internvl2_5", "dynamic_image_size": True, "use_thumbnail": True, "ps_version": "v2",
        "min_dynamic_patch": 1, "max_dynamic_patch": 12,
    }


def official_state_dict_from_hf(hf_sd: dict, hf_config) -> dict:
    """State dict of ``InternVLForConditionalGeneration`` → official keys (q/k/v concatenated into ``attn.qkv``)."""
    out, qkv = {}, {}
    for key, t in hf_sd.items():
        if key.startswith("model.vision_tower."):
            k = key[len("model.vision_tower."):]
            m = re.match(r"^encoder\.layer\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$", k)
            if m:
                qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = t
                continue
            for pat, rep in _VISION_RENAMES:
                if re.match(pat, k):
                    k = re.sub(pat, rep, k)
                    break
            else:
                if k.startswith("layernorm."):  # Identity under use_mean_pooling: no tensors; anything else is foreign
                    raise UnsupportedConfigError(f"vision tower key {key!r} has no official counterpart")
                raise UnsupportedConfigError(f"unexpected vision tower key {key!r}")
            out["vision_model." + k] = t
        elif key.startswith("model.multi_modal_projector."):
            mod, leaf = key[len("model.multi_modal_projector."):].split(".", 1)
            out[f"mlp1.{_PROJECTOR[mod]}.{leaf}"] = t
        elif key.startswith("model.language_model."):
            out["language_model.model." + key[len("model.language_model."):]] = t
        elif key == "lm_head.weight":
            out["language_model.lm_head.weight"] = t
        else:
            raise UnsupportedConfigError(f"unexpected key {key!r} in an InternVLForConditionalGeneration state dict")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise UnsupportedConfigError(f"vision layer {layer}: q/k/v {kind} incomplete ({sorted(parts)})")
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_official_checkpoint_from_hf(hf_model, path: str, max_shard_size: int = 5 * 1024**3) -> str:
    """Write ``hf_model`` (``InternVLForConditionalGeneration``) as an official remote-code layout folder."""
    cfg = official_config_from_hf(hf_model.config)
    dtype = next(hf_model.parameters()).dtype
    cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    sd = official_state_dict_from_hf(dict(hf_model.state_dict()), hf_model.config)
    # tied = the very same tensor (what the model really does, whichever config level asked for it)
    tied = hf_model.lm_head.weight is hf_model.get_input_embeddings().weight
    cfg["llm_config"]["tie_word_embeddings"] = bool(tied)
    if tied:
        sd.pop("language_model.lm_head.weight")
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    save_state_dict(sd, path, max_shard_size=max_shard_size)
    return path
