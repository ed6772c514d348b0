"""qk_norm_attention (rstd pre-pass + flash kernel normalizing q/k tiles on the fly) vs the alternatives.

All rows start from the packed qkv projection ``[B, S, 3C]`` and return ``[B, S, C]``, **including** the QK-RMSNorm
over all C channels: eager PyTorch (the reference), SDPA (each available backend) after the eager norms, SDPA after
our Triton ``rms_norm`` (the best unfused pipeline), and the fused op. Target on an H100: ≥ 1.15× the best SDPA row.
TFLOP/s counts the attention matmuls only (4·B·H·S²·D).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from _kernel_bench import (  # noqa: F401 (cuda_fn is a fixture)
    C6B, D6B, H6B, cuda_fn, dtype_for, impl_label, pinned, tiles_tokens,
)

from internvl_kernels import ops
from internvl_kernels.model import functional as F

SDPA = ("flash", "efficient", "cudnn")

# the Triton interpreter's own NumPy deprecation noise (CPU runs)
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def sdpa_with_norm(backend_name, norm):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(qkv, wq, wk, H, eps, scale):
        B, S, C3 = qkv.shape
        C = C3 // 3
        D = C // H
        q, k, v = qkv.reshape(B, S, 3, C).unbind(2)
        q, k = norm(q, wq, eps), norm(k, wk, eps)
        heads = (t.reshape(B, S, H, D).transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel([backend]):
            o = TF.scaled_dot_product_attention(*heads, scale=scale)
        return o.transpose(1, 2).reshape(B, S, C)

    return run


IMPLS = ["eager", "triton", *(f"sdpa-{b}+eager_norm" for b in SDPA), *(f"sdpa-{b}+triton_norm" for b in SDPA)]


@pytest.mark.benchmark(group="qk_norm_attention")
@pytest.mark.parametrize("impl", IMPLS)
def test_qk_norm_attention(bench_run, bench_device, full_shapes, impl):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    H, D = (H6B, D6B) if full_shapes else (2, D6B)
    C = H * D
    g = dict(device=bench_device, dtype=dt)
    qkv, wq, wk = torch.randn(tiles, seq, 3 * C, **g), torch.randn(C, **g), torch.randn(C, **g)
    scale = D ** -0.5
    if impl.startswith("sdpa"):
        name, norm_kind = impl[len("sdpa-"):].split("+")
        backend = "triton" if norm_kind == "triton_norm" else "eager"
        fn = sdpa_with_norm(name, ops.rms_norm if backend == "triton" else F.rms_norm)
        try:
            pinned(fn, backend)(qkv, wq, wk, H, 1e-6, scale)
        except RuntimeError as e:
            pytest.skip(f"{impl} unavailable here: {str(e).splitlines()[0][:120]}")
        fn = pinned(fn, backend)
    else:
        fn = pinned(F.qk_norm_attention if impl == "eager" else ops.qk_norm_attention, impl)
    bench_run(fn, qkv, wq, wk, H, 1e-6, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "heads": H, "head_dim": D, "vit6b_hidden": C6B},
              dtype=dt, impl=impl_label(impl, bench_device))


# ------------------------------------------------------------------- cuda rows (csrc/ kernels via set_backend("cuda"))
@pytest.mark.gpu
@pytest.mark.benchmark(group="qk_norm_attention")
def test_qk_norm_attention_cuda(bench_run, bench_device, full_shapes, cuda_fn):
    dt = dtype_for(bench_device)
    tiles, seq = tiles_tokens(full_shapes)
    H, D = H6B, D6B
    C = H * D
    g = dict(device=bench_device, dtype=dt)
    qkv, wq, wk = torch.randn(tiles, seq, 3 * C, **g), torch.randn(C, **g), torch.randn(C, **g)
    scale = D ** -0.5
    fn = cuda_fn(ops.qk_norm_attention, "qk_norm_attention", qkv, wq, wk, H, 1e-6, scale)
    bench_run(fn, qkv, wq, wk, H, 1e-6, scale, flops=4 * tiles * H * seq * seq * D,
              shapes={"tiles": tiles, "seq": seq, "hidden": C, "heads": H, "head_dim": D, "vit6b_hidden": C6B},
              dtype=dt, impl="cuda")
