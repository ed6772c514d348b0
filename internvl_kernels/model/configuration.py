"""Configs mirroring the official ``InternVisionConfig`` / ``InternVLChatConfig`` field names.

Unknown fields of an official ``config.json`` (``architectures``, ``torch_dtype``, ``auto_map`` ...) are kept in
``extra`` and written back unchanged; values this implementation cannot honour raise :class:`UnsupportedConfigError`.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from ..checkpoint.config import UnsupportedConfigError, read_config

__all__ = ["InternVisionConfig", "InternVLChatConfig", "UnsupportedConfigError"]


# ``llm_config.architectures[0]`` → the InternVL releases that ship it. Qwen2 / Phi-3 / Llama run as transformers' own
# classes; InternLM2 (no transformers class) is converted to the Llama layout on load.
SUPPORTED_LLMS = {
    "LlamaForCausalLM": "V1.1, V1.2, InternVL2-Llama3-76B / 40B (Llama layout)",
    "InternLM2ForCausalLM": "V1.5, InternVL2 2B/8B/26B, InternVL2.5 4B..26B (InternLM2 / 2.5)",
    "Qwen2ForCausalLM": "InternVL2-1B, InternVL2.5 1B/8B/38B/78B, InternVL3 (Qwen2 / 2.5)",
    "Phi3ForCausalLM": "InternVL2-4B (Phi-3)",
}


def supported_llms_text() -> str:
    return "; ".join(f"{k} ({v})" for k, v in SUPPORTED_LLMS.items())


def _check_int(where: str, name: str, value, minimum: int | None = None) -> None:
    """``value`` is an int (not a bool, not a string such as ``"-1"``) and ``>= minimum``, else a named error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedConfigError(f"{where}{name}={value!r}: must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise UnsupportedConfigError(f"{where}{name}={value}: must be >= {minimum}")


def _check_number(where: str, name: str, value, positive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnsupportedConfigError(f"{where}{name}={value!r}: must be a number, got {type(value).__name__}")
    if positive and not value > 0:
        raise UnsupportedConfigError(f"{where}{name}={value}: must be > 0")


def _check_types(obj, where: str, positive: tuple = (), non_negative: tuple = ()) -> None:
    """The dataclass fields of ``obj`` have the declared JSON types (int / float / bool / str) before any arithmetic
    uses them, so a wrong ``config.json`` gives a named error, not a TypeError / ZeroDivisionError deep inside."""
    for f in dataclasses.fields(obj):
        if f.name == "extra":
            continue
        v = getattr(obj, f.name)
        t = str(f.type)
        if t == "int":
            _check_int(where, f.name, v, 1 if f.name in positive else 0 if f.name in non_negative else None)
        elif t == "int | None":
            if v is not None:
                _check_int(where, f.name, v, 1 if f.name in positive else None)
        elif t == "float":
            _check_number(where, f.name, v, positive=f.name in positive)
        elif t == "bool" and not isinstance(v, bool):
            raise UnsupportedConfigError(f"{where}{f.name}={v!r}: must be true or false")
        elif t == "str" and not isinstance(v, str):
            raise UnsupportedConfigError(f"{where}{f.name}={v!r}: must be a string")


LLM_POSITIVE_INTS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")


def validate_llm_config(llm: dict, where: str = "llm_config.") -> None:
    """The sizes the LLM is built from are positive integers and the head counts divide evenly (named errors)."""
    if not isinstance(llm, dict):
        raise UnsupportedConfigError(f"{where.rstrip('.')} must be a JSON object, got {type(llm).__name__}")
    for k in LLM_POSITIVE_INTS:
        if k in llm:
            _check_int(where, k, llm[k], 1)
    if llm.get("num_key_value_heads") is not None:
        _check_int(where, "num_key_value_heads", llm["num_key_value_heads"], 1)
    h, nh = llm.get("hidden_size"), llm.get("num_attention_heads")
    if h is not None and nh is not None and h % nh:
        raise UnsupportedConfigError(f"{where}hidden_size={h} is not divisible by num_attention_heads={nh}")
    nkv = llm.get("num_key_value_heads")
    if nh is not None and nkv is not None and nh % nkv:
        raise UnsupportedConfigError(f"{where}num_attention_heads={nh} is not divisible by num_key_value_heads={nkv}")


@dataclass
class InternVisionConfig:
    num_channels: int = 3
    patch_size: int = 14
    image_size: int = 448
    qkv_bias: bool = False
    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    qk_normalization: bool = True
    num_hidden_layers: int = 48
    use_flash_attn: bool = False
    hidden_act: str = "gelu"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    dropout: float = 0.0
    drop_path_rate: float = 0.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 0.1
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    def validate(self):
        _check_types(self, "vision_config.", positive=("num_channels", "patch_size", "image_size", "hidden_size",
                                                       "num_attention_heads", "intermediate_size",
                                                       "num_hidden_layers", "layer_norm_eps"))
        if self.hidden_act != "gelu":
            raise UnsupportedConfigError(f"vision_config.hidden_act={self.hidden_act!r}: only 'gelu' (exact erf) is supported")
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise UnsupportedConfigError(f"vision_config.norm_type={self.norm_type!r}: expected 'rms_norm' or 'layer_norm'")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(
                f"vision_config.hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.image_size % self.patch_size:
            raise UnsupportedConfigError(
                f"vision_config.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}"
            )
        if self.num_channels <= 0 or self.num_hidden_layers <= 0:
            raise UnsupportedConfigError("vision_config: num_channels and num_hidden_layers must be positive")
        # InternVL3's vision configs carry the fields of an MoE variant of the tower, switched off in every release
        if self.extra.get("use_moe"):
            raise UnsupportedConfigError("vision_config.use_moe=true: the mixture-of-experts InternViT is not supported")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "InternVisionConfig":
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        if isinstance(kwargs.get("image_size"), (list, tuple)):
            kwargs["image_size"] = int(kwargs["image_size"][0])
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out = {**copy.deepcopy(self.extra), **out}
        out.setdefault("architectures", ["InternVisionModel"])
        out.setdefault("model_type", "intern_vit_6b")
        return out

    @classmethod
    def from_json_file(cls, path: str) -> "InternVisionConfig":
        return cls.from_dict(read_config(path))


@dataclass
class InternVLChatConfig:
    vision_config: InternVisionConfig = field(default_factory=InternVisionConfig)
    llm_config: dict = field(default_factory=dict)
    select_layer: int = -1
    force_image_size: int | None = None
    downsample_ratio: float = 0.5
    template: str | None = None
    dynamic_image_size: bool = False
    use_thumbnail: bool = False
    ps_version: str = "v1"
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 6
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        self.validate()

    def validate(self):
        _check_types(self, "", positive=("force_image_size", "downsample_ratio", "min_dynamic_patch",
                                         "max_dynamic_patch"))
        validate_llm_config(self.llm_config)
        if self.ps_version not in ("v1", "v2"):
            raise UnsupportedConfigError(f"ps_version={self.ps_version!r}: expected 'v1' or 'v2'")
        r = 1 / self.downsample_ratio
        if abs(r - round(r)) > 1e-6:
            raise UnsupportedConfigError(f"downsample_ratio={self.downsample_ratio}: 1/ratio must be an integer")
        n = self.vision_config.num_hidden_layers
        if not (-n - 1 <= self.select_layer <= n):
            raise UnsupportedConfigError(f"select_layer={self.select_layer} out of range for {n} layers")
        arch = self.llm_architecture
        if arch not in SUPPORTED_LLMS:
            raise UnsupportedConfigError(
                f"llm_config.architectures={self.llm_config.get('architectures')!r}: supported LLMs are "
                + supported_llms_text()
            )
        if self.dynamic_image_size and not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch:
            raise UnsupportedConfigError(f"min_dynamic_patch={self.min_dynamic_patch} / max_dynamic_patch="
                                         f"{self.max_dynamic_patch}: need 1 <= min <= max")
        grid = self.image_size // self.vision_config.patch_size
        if grid % round(r):
            raise UnsupportedConfigError(f"patch grid {grid}x{grid} is not divisible by 1/downsample_ratio={round(r)}")

    @property
    def llm_architecture(self) -> str:
        archs = self.llm_config.get("architectures") or ["LlamaForCausalLM"]
        return archs[0]

    @property
    def image_size(self) -> int:
        return int(self.force_image_size or self.vision_config.image_size)

    @property
    def num_image_token(self) -> int:
        return int((self.image_size // self.vision_config.patch_size) ** 2 * self.downsample_ratio**2)

    @classmethod
    def from_dict(cls, d: dict) -> "InternVLChatConfig":
        d = copy.deepcopy(d)
        if "vision_config" not in d or "llm_config" not in d:
            raise UnsupportedConfigError("config.json lacks 'vision_config' / 'llm_config': not an InternVL-Chat checkpoint")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: d.pop(k) for k in list(d) if k in names}
        return cls(**kwargs, extra=d)

    def to_dict(self) -> dict:
        out = {k: getattr(self, k) for k in (f.name for f in dataclasses.fields(self)) if k not in ("extra",)}
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = copy.deepcopy(self.llm_config)
        out = {**copy.deepcopy(self.extra), **out}
        out.setdefault("architectures", ["InternVLChatModel"])
        out.setdefault("model_type", "internvl_chat")
        return out

    @classmethod
    def from_json_file(cls, path: str) -> "InternVLChatConfig":
        return cls.from_dict(read_config(path))
