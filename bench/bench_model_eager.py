"""Eager reference rows: InternViT block (6B and 300M shapes), pixel-shuffle, projector, whole InternViT-6B.

GPU: full InternVL shapes (13 tiles × 1025 tokens, bf16). CPU: reduced token counts (fp32), same widths.
"""
from __future__ import annotations

import pytest
import torch

from internvl_kernels.model import InternVisionConfig, InternVisionEncoderLayer, InternVisionModel
from internvl_kernels.model import functional as KF

VIT_6B = dict(hidden_size=3200, num_attention_heads=25, intermediate_size=12800, qk_normalization=True,
              qkv_bias=False, norm_type="rms_norm")
VIT_300M = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, qk_normalization=False,
                qkv_bias=True, norm_type="layer_norm")
LLM_HIDDEN = 6144  # InternLM2-20B (V1.5)


def _dtype(dev):
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _tokens(full, tiles_full=13):
    # (batch of tiles, tokens per tile)
    return (tiles_full, 1025) if full else (1, 257)


def block_flops(tokens_total: int, S: int, C: int, I: int) -> int:
    """qkv + proj + fc1 + fc2 GEMMs and the two attention matmuls (per token: 8C² + 4CI + 4SC)."""
    return tokens_total * (8 * C * C + 4 * C * I + 4 * S * C)


@pytest.mark.parametrize("shape", ["6b", "300m"])
def test_vit_block_eager(bench_run, bench_device, full_shapes, shape):
    cfg = InternVisionConfig(num_hidden_layers=1, **(VIT_6B if shape == "6b" else VIT_300M))
    dt = _dtype(bench_device)
    blk = InternVisionEncoderLayer(cfg).to(bench_device, dt).eval()
    B, S = _tokens(full_shapes)
    x = torch.randn(B, S, cfg.hidden_size, device=bench_device, dtype=dt)
    with torch.no_grad():
        bench_run(blk, x, flops=block_flops(B * S, S, cfg.hidden_size, cfg.intermediate_size),
                  shapes={"tiles": B, "seq": S, "hidden": cfg.hidden_size, "vit": shape}, dtype=dt, impl="eager")


def test_pixel_shuffle_eager(bench_run, bench_device, full_shapes):
    dt = _dtype(bench_device)
    B = 13 if full_shapes else 2
    x = torch.randn(B, 1024, 3200, device=bench_device, dtype=dt)
    nbytes = 2 * x.numel() * x.element_size()
    bench_run(KF.pixel_shuffle, x, 0.5, "v2", bytes_moved=nbytes,
              shapes={"tiles": B, "tokens": 1024, "hidden": 3200}, dtype=dt, impl="eager")


def test_projector_eager(bench_run, bench_device, full_shapes):
    dt = _dtype(bench_device)
    T = (13 if full_shapes else 1) * 256
    C4, H = 4 * 3200, LLM_HIDDEN
    g = dict(device=bench_device, dtype=dt)
    x = torch.randn(1, T, C4, **g)
    args = (torch.randn(C4, **g), torch.randn(C4, **g), torch.randn(H, C4, **g) * 0.01, torch.randn(H, **g),
            torch.randn(H, H, **g) * 0.01, torch.randn(H, **g))
    with torch.no_grad():
        bench_run(KF.mlp_projector, x, *args, flops=2 * T * (C4 * H + H * H),
                  shapes={"tokens": T, "in": C4, "hidden": H}, dtype=dt, impl="eager")


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [1, 13])
def test_vit6b_forward_eager(bench_run, bench_device, tiles):
    """Full-size random InternViT-6B (45 layers, V1.2/V1.5 depth) in bf16."""
    cfg = InternVisionConfig(num_hidden_layers=45, image_size=448, **VIT_6B)
    with torch.device(bench_device):
        model = InternVisionModel(cfg).to(torch.bfloat16).eval()
    pv = torch.randn(tiles, 3, 448, 448, device=bench_device, dtype=torch.bfloat16)
    with torch.no_grad():
        bench_run(model.forward_features, pv, flops=45 * block_flops(tiles * 1025, 1025, 3200, 12800),
                  shapes={"tiles": tiles, "seq": 1025, "layers": 45}, dtype=torch.bfloat16, impl="eager", rounds=5)
