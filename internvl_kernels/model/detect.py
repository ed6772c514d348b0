"""What kind of checkpoint a folder holds, from its ``config.json`` alone (no weights read).

Kinds: ``"internvl_chat"`` (``vision_config`` + ``llm_config``), ``"intern_vit"`` (a standalone InternViT) and
``"llm"`` (a plain transformers causal LM). The quantizer and the loaders decide with :func:`checkpoint_kind`.
"""
from __future__ import annotations

from ..checkpoint.config import UnsupportedConfigError, read_config

__all__ = ["KINDS", "LLM_ARCHITECTURES", "checkpoint_kind", "detect_checkpoint"]

KINDS = ("internvl_chat", "intern_vit", "llm")
# plain LLM folders the quantizer loads with transformers (Llama-style decoder blocks)
LLM_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def checkpoint_kind(raw: dict) -> str | None:
    """The kind of checkpoint ``raw`` (a parsed config.json) describes, or None when it is none of :data:`KINDS`."""
    archs = raw.get("architectures") or []
    if "vision_config" in raw and "llm_config" in raw:
        return "internvl_chat"
    if "InternVisionModel" in archs or raw.get("model_type") in ("intern_vit_6b", "intern_vit"):
        return "intern_vit"
    if any(str(a).endswith("ForCausalLM") for a in archs):
        return "llm"
    return None


def detect_checkpoint(path: str) -> tuple[str, dict]:
    """``(kind, config dict)`` of a checkpoint folder; errors name the path and what was expected."""
    raw = read_config(path)
    kind = checkpoint_kind(raw)
    archs = raw.get("architectures") or []
    if kind is None:
        raise UnsupportedConfigError(f"{path}: unsupported checkpoint (architectures={archs}); expected an "
                                     "InternVL-Chat folder, a standalone InternViT folder or a Llama-style "
                                     "transformers LLM folder")
    if kind == "llm" and not any(a in LLM_ARCHITECTURES for a in archs):
        raise UnsupportedConfigError(f"unsupported LLM architecture {archs} (supported: Llama-style "
                                     f"{' / '.join(LLM_ARCHITECTURES)})")
    return kind, raw
