"""attention (Triton flash kernel) vs eager PyTorch and every ``F.scaled_dot_product_attention`` backend.

q/k/v come as ``[B, S, H, D]`` views of the packed qkv projection (what the InternViT-300M block has); each row
returns ``[B, S, H·D]`` ready for the output projection, so SDPA rows include their transposes/reshape.
TFLOP/s counts 4·B·H·S²·D (QKᵀ and PV).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from _kernel_bench import (  # noqa: F401 (cuda_fn is a fixture)
    D300M, D6B, H300M, H6B, cuda_fn, dtype_for, impl_label, pinned, tiles_tokens,
)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

SHAPES = {"vit6b_heads": (H6B, D6B), "vit300m_heads": (H300M, D300M)}
SDPA = ("flash", "efficient", "cudnn", "math")

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def sdpa_call(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def run(q, k, v, scale):
        B, S, H, D = q.shape
        with sdpa_kernel([backend]):
            o = TF.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return o.transpose(1, 2).reshape(B, S, H * D)

    return run


def _inputs(bench_device, full_shapes, H, D):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    if not full_shapes:
        H = 2
    qkv = torch.randn(tiles, seq, 3 * H * D, device=bench_device, dtype=dt)
    q, k, v = qkv.reshape(tiles, seq, 3, H, D).unbind(2)
    return q, k, v, dt, tiles, seq, H


@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("impl", ["eager", "triton", *(f"sdpa-{b}" for b in SDPA)])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(bench_run, bench_device, full_shapes, shape, impl):
    H, D = SHAPES[shape]
    q, k, v, dt, tiles, seq, H = _inputs(bench_device, full_shapes, H, D)
    scale = D ** -0.5
    if impl.startswith("sdpa"):
        fn = sdpa_call(impl.split("-", 1)[1])
        try:
            fn(q, k, v, scale)
        except RuntimeError as e:  # backend not available for this device / dtype / shape
            pytest.skip(f"{impl} unavailable here: {str(e).splitlines()[0][:120]}")
        fn = pinned(fn, "eager")
    elif impl == "eager":
        fn = pinned(lambda q, k, v, s: F.attention(q, k, v, s).reshape(tiles, seq, H * D), "eager")
    else:
        fn = pinned(lambda q, k, v, s: ops.attention(q, k, v, s).reshape(tiles, seq, H * D), "triton")
    bench_run(fn, q, k, v, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "heads": H, "head_dim": D}, dtype=dt,
              impl=impl_label(impl, bench_device))


# ------------------------------------------------------------------- cuda rows (csrc/ kernels via set_backend("cuda"))
ATT_SHAPES = {"vit6b_heads": (H6B, D6B), "vit300m_heads": (H300M, D300M)}


@pytest.mark.gpu
@pytest.mark.benchmark(group="attention")
@pytest.mark.parametrize("shape", list(ATT_SHAPES))
def test_attention_cuda(bench_run, bench_device, full_shapes, cuda_fn, shape):
    H, D = ATT_SHAPES[shape]
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    qkv = torch.randn(tiles, seq, 3 * H * D, device=bench_device, dtype=dt)
    q, k, v = qkv.reshape(tiles, seq, 3, H, D).unbind(2)  # strided views, as the other rows get them
    scale = D ** -0.5

    def att(q, k, v, s):
        return ops.attention(q, k, v, s).reshape(tiles, seq, H * D)

    fn = cuda_fn(att, "attention", q, k, v, scale)
    bench_run(fn, q, k, v, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "heads": H, "head_dim": D}, dtype=dt, impl="cuda")
