"""Loaders for quantized (GPTQ / AWQ) checkpoint folders that are not InternVL-Chat folders.

``InternVLChatModel.from_pretrained`` and ``InternVisionModel.from_pretrained`` load quantized folders themselves
(they call :func:`internvl_kernels.quant.apply_quantization` when ``config.json`` has a ``quantization_config``);
this module adds:

* :func:`load_quantized_llm` — a plain transformers LLM folder (``LlamaForCausalLM`` / ``InternLM2ForCausalLM``) in
  GPTQ or AWQ layout → a ``LlamaForCausalLM`` with QuantLinear modules (InternLM2 converted, quantized ``wqkv``
  split into q/k/v);
* :func:`load_quantized_vit` — a standalone InternViT folder written quantized.
"""
from __future__ import annotations

import torch

from ..checkpoint.config import config_dtype, read_config, read_quant_config
from ..checkpoint.files import CheckpointError, load_into_module, load_state_dict
from ..checkpoint.internlm2 import internlm2_to_llama_state_dict
from ..quant.linear import QuantLinear
from ..quant.loading import UnsupportedQuantizationError, apply_quantization
from .chat import llama_config_from_llm_config, materialize_buffers
from .vision import InternVisionModel

__all__ = ["load_quantized_llm", "load_quantized_vit"]

LLM_ARCHITECTURES = ("LlamaForCausalLM", "InternLM2ForCausalLM")


def load_quantized_llm(path: str, dtype: torch.dtype | None = None, device=None):
    """A plain transformers LLM folder in GPTQ / AWQ layout → ``LlamaForCausalLM`` with QuantLinear modules.

    Llama-layout folders (LlamaForCausalLM; AutoGPTQ / GPTQModel / AutoAWQ output, ours) and InternLM2 folders
    (converted to the Llama layout, quantized ``wqkv`` split). ``quantization_config`` is read from config.json or
    ``quantize_config.json``. ``dtype`` defaults to the config's ``torch_dtype`` (else float16).
    """
    from transformers import LlamaForCausalLM

    raw = read_config(path)
    qcfg = read_quant_config(path, raw)
    if not qcfg:
        raise CheckpointError(f"{path}: not a quantized checkpoint (no quantization_config in config.json and no "
                              "quantize_config.json)")
    arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in LLM_ARCHITECTURES:
        raise UnsupportedQuantizationError(f"{path}: architecture {arch!r} is not supported "
                                           f"({', '.join(LLM_ARCHITECTURES)})")
    dtype = dtype or config_dtype(raw) or torch.float16
    lcfg = llama_config_from_llm_config(raw)
    sd = load_state_dict(path)
    if arch == "InternLM2ForCausalLM":
        sd = internlm2_to_llama_state_dict(sd, raw)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        model = LlamaForCausalLM(lcfg)
    model.to(dtype)
    tie = bool(lcfg.tie_word_embeddings)
    if tie and "lm_head.weight" not in sd and "lm_head.qweight" not in sd and "model.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    apply_quantization(model, qcfg, sd, dtype=dtype)
    load_into_module(model, sd, f"{path}: LLM")
    if tie and not isinstance(model.lm_head, QuantLinear):
        model.tie_weights()
    materialize_buffers(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_quantized_vit(path: str, dtype: torch.dtype | None = None, device=None) -> InternVisionModel:
    """A standalone InternViT folder written quantized (``python -m quantize --model <InternViT folder>``: keys
    without ``vision_model.``) → ``InternVisionModel`` with QuantLinear modules. Same as
    ``InternVisionModel.from_pretrained`` but refuses a folder that is not quantized."""
    if not read_quant_config(path):
        raise CheckpointError(f"{path}: not a quantized checkpoint (no quantization_config)")
    return InternVisionModel.from_pretrained(path, dtype=dtype, device=device)
