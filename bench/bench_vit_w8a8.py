"""Full InternViT-6B forward (45 blocks, 13 tiles of 448 px): W8A8 (int8 / fp8, patched) vs bf16 eager vs bf16
patched. GPU-only rows (target: W8A8 ≥ 1.6× bf16 eager). Weights are random (no 6B weights offline); every Linear
of the W8A8 tower is a W8A8Linear built from the bf16 one (per-channel weights, dynamic per-token activations).
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, H6B, I6B, pinned

from internvl_kernels import patch_model, unpatch_model
from internvl_kernels.model import InternVisionConfig, InternVisionModel

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

TILES = 13


def _flops(tiles):
    T, S = tiles * 1025, 1025
    return 45 * T * (8 * C6B * C6B + 4 * C6B * I6B + 4 * S * C6B)


def _to_w8a8(model, quant_dtype):
    from internvl_kernels.quant.w8a8 import W8A8Linear

    for layer in model.encoder.layers:
        for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            parent, _, child = n.rpartition(".")
            setattr(layer.get_submodule(parent), child, W8A8Linear.from_linear(layer.get_submodule(n), quant_dtype))
    return model


@pytest.fixture(scope="module")
def vit6b_cfg(bench_device):
    if bench_device.type != "cuda":
        pytest.skip("InternViT-6B (45 blocks, 11 GB in bf16) at 13 tiles needs a CUDA GPU")
    return InternVisionConfig(num_hidden_layers=45, image_size=448, hidden_size=C6B, num_attention_heads=H6B,
                              intermediate_size=I6B, qk_normalization=True, qkv_bias=False, norm_type="rms_norm")


@pytest.mark.gpu
@pytest.mark.benchmark(group="vit6b_w8a8_forward")
@pytest.mark.parametrize("impl", ["bf16-eager", "bf16-patched", "int8-patched", "fp8-patched"])
def test_vit6b_w8a8_forward(bench_run, bench_device, vit6b_cfg, impl):
    if impl.startswith("fp8") and torch.cuda.get_device_capability(bench_device) < (8, 9):
        pytest.skip("fp8 tensor cores need sm_89+")
    torch.manual_seed(0)
    with torch.device(bench_device):
        model = InternVisionModel(vit6b_cfg).to(torch.bfloat16).eval()
    if impl.startswith(("int8", "fp8")):
        _to_w8a8(model, impl.split("-")[0])
    if impl.endswith("patched"):
        patch_model(model)
    pv = torch.randn(TILES, 3, 448, 448, device=bench_device, dtype=torch.bfloat16)
    fn = pinned(model.forward_features, "auto")
    bench_run(fn, pv, flops=_flops(TILES), shapes={"tiles": TILES, "seq": 1025, "layers": 45, "hidden": C6B},
              dtype=torch.bfloat16, impl=impl, rounds=5)
    unpatch_model(model)
    del model
    torch.cuda.empty_cache()
