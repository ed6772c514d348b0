"""Reference PyTorch implementation of InternVL-Chat (V1.1 / V1.2 / V1.5) loading the official checkpoints.

Names are imported on first use (PEP 562), so ``from internvl_kernels.model import functional`` (what the kernels
do) loads neither transformers nor the chat model.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "chat": ("IMG_CONTEXT_TOKEN", "IMG_END_TOKEN", "IMG_START_TOKEN", "InternVLChatModel",
             "llama_config_from_llm_config", "materialize_buffers"),
    "configuration": ("InternVisionConfig", "InternVLChatConfig", "UnsupportedConfigError"),
    "functional": ("pixel_shuffle", "pixel_shuffle_grid"),
    "checkpoint": ("CheckpointError", "load_state_dict", "save_state_dict"),
    "vision": ("InternAttention", "InternMLP", "InternRMSNorm", "InternVisionEmbeddings", "InternVisionEncoderLayer",
               "InternVisionModel", "VisionOutput"),
    "quantized": ("load_quantized_llm", "load_quantized_vit"),
    "preprocess": ("dynamic_preprocess", "load_image", "build_transform"),  # pulls in PIL
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name):
    # import_module, not ``from . import x``: the latter asks this __getattr__ for ``x`` again
    where = _WHERE.get(name)
    if where == "chat":
        mod = importlib.import_module("internvl_kernels.model.chat")
    elif where == "configuration":
        mod = importlib.import_module("internvl_kernels.model.configuration")
    elif where == "functional":
        mod = importlib.import_module("internvl_kernels.model.functional")
    elif where == "checkpoint":
        mod = importlib.import_module("internvl_kernels.checkpoint")
    elif where == "vision":
        mod = importlib.import_module("internvl_kernels.model.vision")
    elif where == "quantized":
        mod = importlib.import_module("internvl_kernels.model.quantized")
    elif where == "preprocess":
        mod = importlib.import_module("internvl_kernels.model.preprocess")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(mod, name)
