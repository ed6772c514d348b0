"""InternVL-Chat (V1.1 / V1.2 / V1.5, InternVL2 / 2.5 / 3): InternViT → pixel-shuffle → ``mlp1`` → LLM.

Loads the official hub folders (``config.json`` with ``vision_config`` / ``llm_config`` + sharded safetensors)
with the official key names. The LLM is transformers' own class where it has one — ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` (qkv bias), ``Phi3ForCausalLM`` (packed ``qkv_proj`` / ``gate_up_proj``), whose key names are
the checkpoints' own — and InternLM2 / InternLM2.5 (no transformers class) is converted to the Llama layout on load
and back on save.
"""
from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PretrainedConfig

from . import functional as KF
from .configuration import SUPPORTED_LLMS, InternVLChatConfig, UnsupportedConfigError, supported_llms_text
from .conversation import get_conv_template
from ..checkpoint.config import config_dtype, read_config, read_quant_config
from ..checkpoint.files import CheckpointError, load_into_module, load_state_dict, save_state_dict, strip_prefix
from ..checkpoint.internlm2 import (internlm2_config_to_llama, internlm2_to_llama_state_dict,
                                    llama_to_internlm2_state_dict)
from .vision import InternVisionModel

logger = logging.getLogger("internvl_kernels")

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "head_dim", "rope_parameters",
    "rope_theta", "rope_scaling", "initializer_range",
)


def llama_config_from_llm_config(llm_config: dict) -> LlamaConfig:
    """The ``LlamaConfig`` the LLM runs with (InternLM2 configs converted)."""
    arch = (llm_config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch == "InternLM2ForCausalLM":
        kwargs = internlm2_config_to_llama(llm_config)
    elif arch == "LlamaForCausalLM":
        kwargs = {k: v for k, v in llm_config.items() if k in _LLAMA_KEYS}
        if "rope_parameters" not in kwargs:
            rope = {"rope_type": "default", "rope_theta": float(kwargs.pop("rope_theta", 10000.0))}
            scaling = kwargs.pop("rope_scaling", None)
            if scaling:
                rope.update({k: v for k, v in scaling.items() if k != "type"})
                rope["rope_type"] = scaling.get("rope_type", scaling.get("type"))
            kwargs["rope_parameters"] = rope
        else:
            kwargs.pop("rope_theta", None)
            kwargs.pop("rope_scaling", None)
    else:
        raise UnsupportedConfigError(f"{arch!r} does not run as a Llama model (llm_config_to_hf handles {sorted(SUPPORTED_LLMS)})")
    return LlamaConfig(**kwargs)


# config keys of the official llm_config that must not reach transformers' config classes (remote-code wiring, an
# attention backend this process may not have)
_DROP_KEYS = ("auto_map", "attn_implementation", "_attn_implementation", "_name_or_path", "transformers_version",
              "use_flash_attn", "_flash_attn_2_enabled")


def llm_config_to_hf(llm_config: dict) -> PretrainedConfig:
    """The transformers config the LLM runs with: ``LlamaConfig`` (Llama, InternLM2 converted), ``Qwen2Config``,
    ``Phi3Config``. Unknown architectures raise :class:`UnsupportedConfigError` naming the supported ones."""
    arch = (llm_config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_LLMS:
        raise UnsupportedConfigError(f"llm_config.architectures={llm_config.get('architectures')!r}: supported LLMs "
                                     f"are {supported_llms_text()}")
    if arch in ("LlamaForCausalLM", "InternLM2ForCausalLM"):
        return llama_config_from_llm_config(llm_config)
    kwargs = {k: v for k, v in llm_config.items() if k not in _DROP_KEYS}
    if arch == "Qwen2ForCausalLM":
        from transformers import Qwen2Config

        return Qwen2Config(**kwargs)
    from transformers import Phi3Config

    scaling = kwargs.get("rope_scaling")
    if isinstance(scaling, dict) and scaling.get("type", scaling.get("rope_type")) in ("su", "longrope", "yarn"):
        # Phi-3 long-context configs keep original_max_position_embeddings at the top level; transformers 5 wants it
        # inside the rope parameters too
        scaling = dict(scaling)
        if "original_max_position_embeddings" in kwargs:
            scaling.setdefault("original_max_position_embeddings", kwargs["original_max_position_embeddings"])
        kwargs["rope_scaling"] = scaling
    return Phi3Config(**kwargs)


def build_language_model(llm_config: dict) -> PreTrainedModel:
    """A fresh transformers causal LM for ``llm_config`` (its class as :func:`llm_config_to_hf` decides)."""
    cfg = llm_config_to_hf(llm_config)
    arch = (llm_config.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch == "Qwen2ForCausalLM":
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM(cfg)
    if arch == "Phi3ForCausalLM":
        from transformers import Phi3ForCausalLM

        return Phi3ForCausalLM(cfg)
    return LlamaForCausalLM(cfg)


class InternVLChatModel(nn.Module):
    def __init__(self, config: InternVLChatConfig, language_model: PreTrainedModel | None = None):
        super().__init__()
        self.config = config
        self.select_layer = config.select_layer
        self.template = config.template
        self.ps_version = config.ps_version
        self.downsample_ratio = config.downsample_ratio
        self.num_image_token = config.num_image_token
        self.vision_model = InternVisionModel(config.vision_config)
        if language_model is None:
            language_model = build_language_model(config.llm_config)
        self.language_model = language_model
        vit_hidden = config.vision_config.hidden_size
        llm_hidden = self.language_model.config.hidden_size
        r = round(1 / config.downsample_ratio)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden * r * r),
            nn.Linear(vit_hidden * r * r, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.img_context_token_id: int | None = None
        self.system_message = get_conv_template(self.template).system_message if self.template else None

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def dtype(self):
        return self.vision_model.dtype

    @property
    def device(self):
        return self.vision_model.device

    # -- vision path ----------------------------------------------------------------------------------------------
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """Official semantics on a ``[N, W, H, C]`` grid (``ps_version`` chooses v1 / v2)."""
        return KF.pixel_shuffle_grid(x, scale_factor, self.ps_version)

    def pixel_shuffle_and_project(self, vit_tokens: torch.Tensor) -> torch.Tensor:
        """ViT tokens without cls ``[B, N, C]`` → projector output ``[B, N·r², H_llm]``."""
        B, N, C = vit_tokens.shape
        side = int(round(N**0.5))
        if side * side != N:
            raise ValueError(f"{N} vision tokens do not form a square grid")
        x = self.pixel_shuffle(vit_tokens.reshape(B, side, side, C), scale_factor=self.downsample_ratio)
        x = x.reshape(B, -1, x.shape[-1])
        return self.mlp1(x)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Image tiles ``[T, 3, H, W]`` → image-token embeddings ``[T, num_image_token, H_llm]``."""
        S, P = self.config.image_size, self.config.vision_config.patch_size
        hw = tuple(pixel_values.shape[-2:])
        if pixel_values.dim() == 4 and hw != (S, S) and not (hw[0] % P or hw[1] % P):  # other shapes: the ViT says
            raise ValueError(
                f"pixel_values must be tiles [T, 3, {S}, {S}] (this model's image size is {S} px, "
                f"{self.num_image_token} image tokens per tile), got {tuple(pixel_values.shape)}; preprocess with "
                f"load_image(image, input_size={S})"
            )
        vit_embeds = self.vision_model.forward_features(pixel_values.to(self.dtype), self.select_layer)
        vit_embeds = vit_embeds[:, 1:, :]
        return self.pixel_shuffle_and_project(vit_embeds)

    def load_image(self, image) -> torch.Tensor:
        """A path / PIL image / HWC array → ``pixel_values`` as this checkpoint was trained: dynamic tiling with
        ``min_dynamic_patch``..``max_dynamic_patch`` tiles and a thumbnail when ``dynamic_image_size`` /
        ``use_thumbnail`` say so, else one tile (``force_image_size`` or the ViT's image size)."""
        from .preprocess import load_image

        c = self.config
        return load_image(image, input_size=c.image_size, max_num=c.max_dynamic_patch, min_num=c.min_dynamic_patch,
                          use_thumbnail=c.use_thumbnail, dynamic=c.dynamic_image_size)

    # -- LLM path -------------------------------------------------------------------------------------------------
    def _embed_with_images(self, input_ids, pixel_values=None, visual_features=None, image_flags=None):
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is None and visual_features is None:
            return embeds
        if self.img_context_token_id is None:
            raise RuntimeError(
                "img_context_token_id is not set: call chat(), or set model.img_context_token_id = "
                f"tokenizer.convert_tokens_to_ids('{IMG_CONTEXT_TOKEN}')"
            )
        vit_embeds = visual_features if visual_features is not None else self.extract_feature(pixel_values)
        if image_flags is not None:
            vit_embeds = vit_embeds[image_flags.view(-1) == 1]
        B, N, C = embeds.shape
        flat = embeds.reshape(B * N, C)
        selected = input_ids.reshape(B * N) == self.img_context_token_id
        n_slots, n_feats = int(selected.sum()), vit_embeds.shape[0] * vit_embeds.shape[1]
        if n_slots != n_feats:
            raise ValueError(
                f"the prompt has {n_slots} {IMG_CONTEXT_TOKEN} tokens but the images give {n_feats} embeddings "
                f"({vit_embeds.shape[0]} tiles × {vit_embeds.shape[1]})"
            )
        flat = flat.clone()
        flat[selected] = vit_embeds.reshape(-1, C).to(flat.dtype)
        return flat.reshape(B, N, C)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, image_flags=None, labels=None, **kwargs):
        """Logits of the LLM with the image tokens spliced in (``labels`` → loss, as transformers)."""
        embeds = self._embed_with_images(input_ids, pixel_values, image_flags=image_flags)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, visual_features=None,
                 generation_config=None, **generate_kwargs):
        embeds = self._embed_with_images(input_ids, pixel_values, visual_features)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, generation_config=generation_config,
            **generate_kwargs,
        )

    @torch.no_grad()
    def chat(self, tokenizer, pixel_values, question: str, generation_config: dict | None = None, history=None,
             return_history: bool = False, num_patches_list=None, verbose: bool = False):
        """One turn of chat, as the official ``InternVLChatModel.chat``."""
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" + question
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        if pixel_values is not None and sum(num_patches_list) != pixel_values.shape[0]:
            raise ValueError(f"num_patches_list sums to {sum(num_patches_list)} but pixel_values has {pixel_values.shape[0]} tiles")
        ctx_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        if ctx_id is None or ctx_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {IMG_CONTEXT_TOKEN} token")
        self.img_context_token_id = ctx_id

        template = get_conv_template(self.template)
        if self.system_message is not None:
            template.system_message = self.system_message
        for old_q, old_a in history or []:
            template.append_message(template.roles[0], old_q)
            template.append_message(template.roles[1], old_a)
        template.append_message(template.roles[0], question)
        template.append_message(template.roles[1], None)
        query = template.get_prompt()
        for n in num_patches_list:
            image_tokens = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * self.num_image_token * n + IMG_END_TOKEN
            query = query.replace("<image>", image_tokens, 1)
        if verbose:
            print(query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "<IMG_CONTEXT × n>"))

        inputs = tokenizer(query, return_tensors="pt")
        input_ids = inputs["input_ids"].to(self.device)
        attention_mask = inputs["attention_mask"].to(self.device)
        gen = dict(generation_config or {"max_new_tokens": 64, "do_sample": False})
        gen.setdefault("use_cache", True)
        stop_ids = [tokenizer.convert_tokens_to_ids(s) for s in template.stop_strings]
        stop_ids = [i for i in stop_ids if i is not None and i != tokenizer.unk_token_id]
        if tokenizer.eos_token_id is not None:
            stop_ids.append(tokenizer.eos_token_id)
        gen.setdefault("eos_token_id", stop_ids or None)
        gen.setdefault("pad_token_id", tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0])
        output = self.generate(
            pixel_values=pixel_values.to(self.device) if pixel_values is not None else None,
            input_ids=input_ids, attention_mask=attention_mask, generation_config=GenerationConfig(**gen),
        )
        response = tokenizer.batch_decode(output, skip_special_tokens=True)[0]
        for s in template.stop_strings:
            response = response.split(s)[0]
        response = response.strip()
        history = list(history or []) + [(question, response)]
        return (response, history) if return_history else response

    # -- loading / saving -----------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None) -> "InternVLChatModel":
        """Load an official InternVL-Chat hub folder (or one written by :meth:`save_pretrained` / the fixtures)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder not found: {path}")
        raw = read_config(path)
        config = InternVLChatConfig.from_dict(raw)
        dtype = dtype or config_dtype(raw) or torch.float32
        # Tensors go straight to ``device`` shard by shard (host memory never holds the whole model).
        sd = load_state_dict(path, device=device)
        qcfg = read_quant_config(path, raw)

        with torch.device("meta"):
            model = cls(config)
        model.to(dtype)

        vis = strip_prefix(sd, "vision_model.")
        mlp = strip_prefix(sd, "mlp1.")
        llm = strip_prefix(sd, "language_model.")
        other = [k for k in sd if not k.startswith(("vision_model.", "mlp1.", "language_model."))]
        if other:
            raise CheckpointError(f"{path}: unexpected keys outside vision_model/mlp1/language_model: {other[:6]}")
        if config.llm_architecture == "InternLM2ForCausalLM":
            llm = internlm2_to_llama_state_dict(llm, config.llm_config)
        llm = {k: v for k, v in llm.items() if not k.endswith("rotary_emb.inv_freq")}
        if model.language_model.config.tie_word_embeddings and not {"lm_head.weight", "lm_head.qweight"} & set(llm):
            llm["lm_head.weight"] = llm.get("model.embed_tokens.weight")

        if qcfg:
            from ..quant.loading import apply_quantization  # the quantized runtime

            apply_quantization(model, qcfg, sd_parts={"vision_model": vis, "mlp1": mlp, "language_model": llm}, dtype=dtype)
        # load_into_module casts floating tensors to each module's own dtype (quantized buffers keep theirs).
        load_into_module(model.vision_model, vis, f"{path}: vision_model")
        load_into_module(model.mlp1, mlp, f"{path}: mlp1")
        load_into_module(model.language_model, llm, f"{path}: language_model")
        if model.language_model.config.tie_word_embeddings and isinstance(model.language_model.lm_head, nn.Linear):
            model.language_model.tie_weights()
        materialize_buffers(model)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with the official checkpoint keys (InternLM2 layout for V1.5)."""
        sd = {}
        for k, v in self.vision_model.state_dict().items():
            sd[f"vision_model.{k}"] = v
        for k, v in self.mlp1.state_dict().items():
            sd[f"mlp1.{k}"] = v
        llm = dict(self.language_model.state_dict())
        if self.language_model.config.tie_word_embeddings:
            llm.pop("lm_head.weight", None)
        if self.config.llm_architecture == "InternLM2ForCausalLM":
            llm = llama_to_internlm2_state_dict(llm, self.config.llm_config)
        for k, v in llm.items():
            sd[f"language_model.{k}"] = v
        return sd

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 1024**3, tokenizer=None) -> None:
        os.makedirs(path, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(self.dtype).replace("torch.", "")
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
        save_state_dict(self.official_state_dict(), path, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def materialize_buffers(model: nn.Module) -> None:
    """Re-create non-persistent buffers left on the meta device (RoPE ``inv_freq``) on the CPU."""
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.is_meta:
                if hasattr(mod, "rope_init_fn") or "inv_freq" in name:
                    fresh = type(mod)(mod.config) if hasattr(mod, "config") else None
                    if fresh is None:
                        raise RuntimeError(f"cannot materialize buffer {name} of {type(mod).__name__}")
                    for n2, b2 in fresh._buffers.items():
                        mod._buffers[n2] = b2
                    for attr in ("attention_scaling", "original_inv_freq"):
                        if hasattr(fresh, attr):
                            setattr(mod, attr, getattr(fresh, attr))
                    break
                raise RuntimeError(f"buffer {name} of {type(mod).__name__} was not in the checkpoint")
