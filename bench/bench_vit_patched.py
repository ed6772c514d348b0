"""Whole InternViT forward: patched (fused kernels) vs eager reference.

GPU: InternViT-6B at V1.2/V1.5 depth (45 blocks, random init, bf16) for 1 and 13 tiles of 448 px (1025 tokens);
target on an H100 ≥ 1.3× eager. CPU: the full model is skipped (GPU-only, see the reason); a reduced 2-block
model (6B layout at tiny width, Triton under the interpreter) runs instead so the row cannot rot.
TFLOP/s counts the block GEMMs and attention matmuls.
"""
from __future__ import annotations

import pytest
import torch
from _kernel_bench import C6B, H6B, I6B, impl_label, pinned

from internvl_kernels import patch_model, unpatch_model
from internvl_kernels.model import InternVisionConfig, InternVisionModel

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def block_flops(tokens_total: int, S: int, C: int, I: int) -> int:
    return tokens_total * (8 * C * C + 4 * C * I + 4 * S * C)


@pytest.fixture(scope="module")
def vit6b(bench_device):
    if bench_device.type != "cuda":
        pytest.skip("InternViT-6B (45 blocks, 11 GB in bf16) needs a CUDA GPU; the reduced CPU row runs instead")
    cfg = InternVisionConfig(num_hidden_layers=45, image_size=448, hidden_size=C6B, num_attention_heads=H6B,
                             intermediate_size=I6B, qk_normalization=True, qkv_bias=False, norm_type="rms_norm")
    torch.manual_seed(0)
    with torch.device(bench_device):
        model = InternVisionModel(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():  # non-trivial norm weights / layer scales
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(("ls1", "ls2")):
                p.copy_(0.1 * (1 + 0.2 * torch.randn_like(p)))
    yield model
    unpatch_model(model)


@pytest.mark.gpu
@pytest.mark.benchmark(group="vit6b_forward")
@pytest.mark.parametrize("impl", ["eager", "patched"])
@pytest.mark.parametrize("tiles", [1, 13])
def test_vit6b_forward(bench_run, bench_device, vit6b, tiles, impl):
    unpatch_model(vit6b)
    if impl == "patched":
        patch_model(vit6b)
    pv = torch.randn(tiles, 3, 448, 448, device=bench_device, dtype=torch.bfloat16)
    fn = pinned(vit6b.forward_features, "auto")  # auto: Triton (or the CUDA extension) on CUDA tensors
    bench_run(fn, pv, flops=45 * block_flops(tiles * 1025, 1025, C6B, I6B),
              shapes={"tiles": tiles, "seq": 1025, "layers": 45, "hidden": C6B}, dtype=torch.bfloat16,
              impl=impl, rounds=5)
    unpatch_model(vit6b)


@pytest.mark.benchmark(group="vit_reduced_forward")
@pytest.mark.parametrize("impl", ["eager", "patched"])
def test_vit_reduced_forward(bench_run, bench_device, impl):
    """2 blocks of the 6B layout at width 256 (2 heads x 128), one 56 px tile (17 tokens)."""
    cfg = InternVisionConfig(num_hidden_layers=2, image_size=56, hidden_size=256, num_attention_heads=2,
                             intermediate_size=640, qk_normalization=True, qkv_bias=False, norm_type="rms_norm")
    torch.manual_seed(0)
    model = InternVisionModel(cfg).to(bench_device).eval()
    backend = "eager"
    if impl == "patched":
        patch_model(model)
        backend = "triton"
    pv = torch.randn(1, 3, 56, 56, device=bench_device)
    bench_run(pinned(model.forward_features, backend), pv, flops=2 * block_flops(17, 17, 256, 640),
              shapes={"tiles": 1, "seq": 17, "layers": 2, "hidden": 256}, dtype=torch.float32,
              impl=impl_label("triton-patched" if impl == "patched" else "eager", bench_device))
