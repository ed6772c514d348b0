"""Reference PyTorch implementation of InternVL-Chat (V1.1 / V1.2 / V1.5, InternVL2 / 2.5 / 3) loading the official checkpoints.

Names are imported on first use (PEP 562), so ``from internvl_kernels.model import functional`` (what the kernels
do) loads neither transformers nor the chat model.
"""
from __future__ import annotations

from ..lazy_exports import lazy_exports

_EXPORTS = {
    "internvl_kernels.model.chat": ("IMG_CONTEXT_TOKEN", "IMG_END_TOKEN", "IMG_START_TOKEN", "InternVLChatModel",
                                    "llama_config_from_llm_config", "materialize_buffers", "build_language_model",
                                    "llm_config_to_hf"),
    "internvl_kernels.model.configuration": ("SUPPORTED_LLMS", "InternVisionConfig", "InternVLChatConfig",
                                             "UnsupportedConfigError"),
    "internvl_kernels.model.functional": ("pixel_shuffle", "pixel_shuffle_grid"),
    "internvl_kernels.checkpoint": ("CheckpointError", "load_state_dict", "save_state_dict"),
    "internvl_kernels.model.vision": ("InternAttention", "InternMLP", "InternRMSNorm", "InternVisionEmbeddings",
                                      "InternVisionEncoderLayer", "InternVisionModel", "VisionOutput"),
    "internvl_kernels.model.quantized": ("load_quantized_llm", "load_quantized_vit"),
    "internvl_kernels.model.preprocess": ("dynamic_preprocess", "load_image", "build_transform"),  # pulls in PIL
}

__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__ = lazy_exports(__name__, {name: mod for mod, names in _EXPORTS.items() for name in names})
