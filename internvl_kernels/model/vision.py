"""InternViT (6B and 300M shapes) in eager PyTorch, key-compatible with the official checkpoints.

Module / parameter names follow the official ``modeling_intern_vit.py`` so ``state_dict()`` keys are the checkpoint
keys: ``embeddings.{class_embedding, position_embedding, patch_embedding.weight/bias}``,
``encoder.layers.N.{attn.qkv, attn.q_norm, attn.k_norm, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2, ls1, ls2}``.
The math is written with :mod:`internvl_kernels.model.functional` (the same references the kernels are tested against).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as KF
from .configuration import InternVisionConfig
from ..checkpoint.config import read_config, read_quant_config
from ..checkpoint.files import load_into_module, load_state_dict, save_state_dict, strip_prefix


class InternRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    @property
    def variance_epsilon(self):  # the official attribute name
        return self.eps

    def forward(self, x):
        return KF.rms_norm(x, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(norm_type: str, hidden_size: int, eps: float) -> nn.Module:
    if norm_type == "rms_norm":
        return InternRMSNorm(hidden_size, eps=eps)
    if norm_type == "layer_norm":
        return nn.LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}")


class InternVisionEmbeddings(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def _get_pos_embed(self, pos_embed: torch.Tensor, H: int, W: int) -> torch.Tensor:
        # As the official code: bicubic interpolation of the grid part in fp32 (identity at the native size).
        target_dtype = pos_embed.dtype
        g = self.image_size // self.patch_size
        pos_embed = pos_embed.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pos_embed = F.interpolate(pos_embed, size=(H, W), mode="bicubic", align_corners=False)
        return pos_embed.reshape(1, -1, H * W).permute(0, 2, 1).to(target_dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must be [batch, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        if pixel_values.shape[-1] % self.patch_size or pixel_values.shape[-2] % self.patch_size:
            raise ValueError(
                f"image size {tuple(pixel_values.shape[-2:])} is not a multiple of the patch size {self.patch_size}"
            )
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))  # B, C, h, w
        batch_size, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = torch.cat(
            [self.position_embedding[:, :1, :], self._get_pos_embed(self.position_embedding[:, 1:, :], height, width)],
            dim=1,
        )
        return embeddings + position_embedding.to(target_dtype)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)
        if self.qk_normalization:
            out = KF.qk_norm_attention(qkv, self.q_norm.weight, self.k_norm.weight, self.num_heads, self.q_norm.eps, self.scale)
        else:
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)
            out = KF.attention(q, k, v, self.scale).reshape(B, N, C)
        return self.proj(out)


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = nn.GELU()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.norm_type = config.norm_type
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = make_norm(config.norm_type, self.embed_dim, config.layer_norm_eps)
        self.norm2 = make_norm(config.norm_type, self.embed_dim, config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states).to(hidden_states.dtype)) * self.ls1
        hidden_states = hidden_states + self.mlp(self.norm2(hidden_states).to(hidden_states.dtype)) * self.ls2
        return hidden_states


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor, num_layers: int | None = None, states: list | None = None):
        """Run the first ``num_layers`` blocks (all by default); each block's output is appended to ``states``."""
        for layer in self.layers[:num_layers]:
            hidden_states = layer(hidden_states)
            if states is not None:
                states.append(hidden_states)
        return hidden_states


@dataclass
class VisionOutput:
    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: tuple | None = None

    def __getitem__(self, i):  # tuple-style access like transformers' ModelOutput
        return (self.last_hidden_state, self.pooler_output, self.hidden_states)[i]


class InternVisionModel(nn.Module):
    """InternViT. ``model(pixel_values)`` → :class:`VisionOutput` (``last_hidden_state`` includes the cls token)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    @property
    def dtype(self):
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def device(self):
        return self.embeddings.patch_embedding.weight.device

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False, return_dict: bool = True):
        h = self.embeddings(pixel_values)
        states = [h] if output_hidden_states else None
        h = self.encoder(h, states=states)
        return VisionOutput(last_hidden_state=h, pooler_output=h[:, 0, :], hidden_states=tuple(states) if states else None)

    def forward_features(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        """``hidden_states[layer]`` (0 = embeddings, i = output of block i), running only the blocks needed."""
        n = len(self.encoder.layers)
        idx = layer if layer >= 0 else n + 1 + layer
        if not 0 <= idx <= n:
            raise IndexError(f"layer {layer} out of range for {n} blocks")
        return self.encoder(self.embeddings(pixel_values), num_layers=idx)

    # -- loading ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None, device=None) -> "InternVisionModel":
        """Load a standalone InternViT folder (``config.json`` + safetensors; keys without ``vision_model.``)."""
        raw = read_config(path)
        config = InternVisionConfig.from_dict(raw)
        sd = load_state_dict(path, device=device)  # floating tensors are cast to the module dtypes on assignment
        if any(k.startswith("vision_model.") for k in sd):  # an InternVL-Chat folder's vision tower
            sd = strip_prefix(sd, "vision_model.")
        if dtype is None:  # keep the checkpoint's dtype (quantization scales excluded)
            dtype = next((t.dtype for k, t in sd.items() if t.is_floating_point() and not k.endswith(".scales")),
                         torch.float32)
        with torch.device("meta"):
            model = cls(config)
        model.to(dtype)
        qcfg = read_quant_config(path, raw)
        if qcfg:  # GPTQ / AWQ folder written by ``python -m quantize``: QuantLinear for every ``.qweight``
            from ..quant.loading import apply_quantization  # the quantized runtime

            apply_quantization(model, qcfg, sd, dtype=dtype)
        load_into_module(model, sd, f"InternViT checkpoint {path}")
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def save_pretrained(self, path: str, max_shard_size: int = 5 * 1024**3) -> None:
        import json

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config.to_dict(), f, indent=2)
        save_state_dict(self.state_dict(), path, max_shard_size=max_shard_size)
