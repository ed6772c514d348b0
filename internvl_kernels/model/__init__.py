"""Reference PyTorch implementation of InternVL-Chat (V1.1 / V1.2 / V1.5, InternVL2 / 2.5 / 3) loading the official
checkpoints."""
from .chat import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    InternVLChatModel,
    build_language_model,
    llama_config_from_llm_config,
    llm_config_to_hf,
)
from .configuration import SUPPORTED_LLMS, InternVisionConfig, InternVLChatConfig, UnsupportedConfigError
from .functional import pixel_shuffle, pixel_shuffle_grid
from .loading import CheckpointError, load_state_dict, save_state_dict
from .vision import (
    InternAttention,
    InternMLP,
    InternRMSNorm,
    InternVisionEmbeddings,
    InternVisionEncoderLayer,
    InternVisionModel,
    VisionOutput,
)

__all__ = [
    "InternVisionConfig", "InternVLChatConfig", "InternVisionModel", "InternVLChatModel", "InternVisionEncoderLayer",
    "InternAttention", "InternMLP", "InternRMSNorm", "InternVisionEmbeddings", "VisionOutput", "pixel_shuffle",
    "pixel_shuffle_grid", "llama_config_from_llm_config", "llm_config_to_hf", "build_language_model", "SUPPORTED_LLMS", "load_state_dict", "save_state_dict", "CheckpointError",
    "UnsupportedConfigError", "IMG_CONTEXT_TOKEN", "IMG_START_TOKEN", "IMG_END_TOKEN", "dynamic_preprocess",
    "load_image", "build_transform",
]


def __getattr__(name):  # preprocessing pulls in PIL; import lazily
    if name in ("dynamic_preprocess", "load_image", "build_transform"):
        from . import preprocess

        return getattr(preprocess, name)
    raise AttributeError(name)
