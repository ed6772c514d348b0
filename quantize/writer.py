"""Write a quantized checkpoint folder in the source checkpoint's own (official) layout.

* Unquantized tensors keep their official names and the model's dtype; quantized Linears become
  ``<name>.qweight / .qzeros / .scales / .g_idx (GPTQ formats) / .bias`` (see :mod:`internvl_kernels.quant.formats`).
* InternVL-Chat-V1.5 (InternLM2 LLM): the LLM is written in the InternLM2 layout — q/k/v of each layer merged into
  one quantized ``attention.wqkv`` (:func:`internvl_kernels.checkpoint.internlm2.merge_quantized_wqkv`), ``wo``, ``w1/w3/w2``.
* ``config.json`` = the source config + ``quantization_config``; ``quantize_config.json`` holds the same dict;
  tokenizer and every other non-weight file of the source folder are copied.
* Sharded safetensors + index via ``internvl_kernels.checkpoint.files.save_state_dict``.
"""
from __future__ import annotations

import json
import os
import re

from internvl_kernels.checkpoint import internlm2
from internvl_kernels.checkpoint.files import save_state_dict

__all__ = ["official_linear_name", "build_state_dict", "write_checkpoint", "copy_other_files"]


def official_linear_name(kind: str, name: str, model) -> str:
    """In-memory Linear name → the name its tensors get in the written checkpoint (non-q/k/v)."""
    if kind == "internvl_chat" and name.startswith("language_model.") and \
            model.config.llm_architecture == "InternLM2ForCausalLM":
        return "language_model." + internlm2.to_internlm2_name(name[len("language_model."):])  # q/k/v → wqkv
    return name


def build_state_dict(kind: str, model, results: dict, fmt: str) -> tuple[dict, list[str]]:
    """The tensors to write and the official names of the quantized Linears."""
    if kind == "internvl_chat":
        sd = dict(model.official_state_dict())
    elif kind == "llm":
        sd = dict(model.state_dict())
        if getattr(model.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
    elif kind == "intern_vit":
        sd = dict(model.state_dict())
    else:
        raise ValueError(f"unknown model kind {kind!r}")
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    is_internlm2 = kind == "internvl_chat" and model.config.llm_architecture == "InternLM2ForCausalLM"
    quantized: list[str] = []
    pending_qkv: dict[str, dict] = {}
    for name, r in results.items():
        module = model.get_submodule(name)
        tensors = r.pack(fmt)
        if module.bias is not None:
            tensors["bias"] = module.bias.detach().cpu()
        m = re.match(r"^language_model\.(model\.layers\.\d+)\.self_attn\.(q|k|v)_proj$", name)
        if is_internlm2 and m:
            pending_qkv.setdefault(m.group(1), {})[m.group(2)] = tensors
            continue
        off = official_linear_name(kind, name, model)
        if off + ".weight" not in sd:
            raise KeyError(f"writer: {off}.weight is not in the model's state dict")
        del sd[off + ".weight"]
        sd.pop(off + ".bias", None)
        for k, t in tensors.items():
            sd[f"{off}.{k}"] = t
        quantized.append(off)
    if pending_qkv:
        nh, nkv, hd = internlm2.heads(model.config.llm_config)
        for layer, parts in pending_qkv.items():
            if set(parts) != {"q", "k", "v"}:
                raise ValueError(f"{layer}: InternLM2 packs q/k/v into one wqkv; quantize all three or none "
                                 f"(got {sorted(parts)})")
            merged = internlm2.merge_quantized_wqkv(parts["q"], parts["k"], parts["v"], nh, nkv, hd, fmt,
                                                    results[f"language_model.{layer}.self_attn.q_proj"].bits)
            off = f"language_model.{layer}.attention.wqkv"
            del sd[off + ".weight"]
            sd.pop(off + ".bias", None)
            for k, t in merged.items():
                sd[f"{off}.{k}"] = t
            quantized.append(off)
    return sd, sorted(quantized)


_NOT_COPIED = {"config.json", "quantize_config.json", "quant_report.json", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}


def copy_other_files(src: str, dst: str) -> list[str]:
    """Copy every file of ``src`` except weights, indexes and the config (tokenizer, generation config, code, ...)."""
    import shutil

    copied = []
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if not os.path.isfile(p) or name in _NOT_COPIED or name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            continue
        shutil.copy2(p, os.path.join(dst, name))
        copied.append(name)
    return copied


def write_checkpoint(out_dir: str, kind: str, model, raw_config: dict, results: dict, qconfig: dict,
                     src_dir: str | None = None, tokenizer=None, max_shard_size: int = 5 * 1024 ** 3,
                     qconfig_in_llm_config: bool = False) -> list[str]:
    """Write everything into ``out_dir`` (which must exist and be empty: the caller's temporary folder).

    ``qconfig_in_llm_config``: InternVL-Chat also gets ``llm_config.quantization_config`` (lmdeploy's PyTorch engine
    reads it there, as lmdeploy's own ``auto_awq`` writes it).
    """
    sd, quantized = build_state_dict(kind, model, results, qconfig["format"] if "format" in qconfig else
                                     ("awq" if qconfig["quant_method"] == "awq" else qconfig["checkpoint_format"]))
    copied = []
    if src_dir is not None:
        copied = copy_other_files(src_dir, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    qconfig = dict(qconfig)
    qconfig["quantized_modules"] = quantized
    cfg = dict(raw_config)
    cfg["quantization_config"] = qconfig
    if qconfig_in_llm_config and kind == "internvl_chat" and isinstance(cfg.get("llm_config"), dict):
        cfg["llm_config"] = {**cfg["llm_config"], "quantization_config": qconfig}
    dtypes = {str(t.dtype).replace("torch.", "") for k, t in sd.items() if t.is_floating_point()
              and not k.endswith(".scales")}
    if len(dtypes) == 1:
        cfg["torch_dtype"] = dtypes.pop()
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(qconfig, f, indent=2)
    files = save_state_dict(sd, out_dir, max_shard_size=max_shard_size,
                            metadata={"quantized_by": "internvl-kernels quantize"})
    return files + copied
