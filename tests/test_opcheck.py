"""torch.library.opcheck on every custom op (schema, fake tensor / meta, autograd registration, AOT dispatch),
with the eager implementation and with the Triton kernels; plus torch.compile(fullgraph=True) over each op."""
from __future__ import annotations

import pytest
import torch

import internvl_kernels.ops  # noqa: F401  (registers the ops)
from internvl_kernels import ops, set_backend

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _samples(device, dtype=torch.float32):
    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    C = 128
    # quant_matmul: a random 4-bit GPTQ v1 weight (K=64, N=32, group 32) packed by the quantizer's packer
    from internvl_kernels.quant.formats import pack_gptq

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 64), generator=g, dtype=torch.int32)
    zeros = torch.randint(1, 16, (2, 32), generator=g, dtype=torch.int32)
    qweight, qzeros = (t.to(device) for t in pack_gptq(codes, zeros, 4, version=1))
    scales = (torch.rand(2, 32, generator=g) * 0.02 + 0.005).half().to(device)
    return {
        "rms_norm": ((r(2, 5, 96), r(96), 1e-6), {}),
        "layer_norm": ((r(2, 5, 96), r(96), r(96), 1e-6), {}),
        "add_rms_norm": ((r(2, 5, 96), r(2, 5, 96), r(96), 1e-6, r(96)), {}),
        "add_layer_norm": ((r(2, 5, 96), r(2, 5, 96), r(96), None, 1e-6, None), {}),
        "attention": ((r(1, 9, 2, 64), r(1, 11, 2, 64), r(1, 11, 2, 64), None), {}),
        "qk_norm_attention": ((r(1, 9, 3 * C), r(C), r(C), 2, 1e-6, 0.125, "exact"), {}),
        "pixel_shuffle": ((r(2, 16, 8), 0.5, "v1"), {}),
        "pixel_shuffle_layer_norm": ((r(2, 16, 8), r(32), r(32), 0.5, "v2", 1e-5), {}),
        "linear": ((r(2, 3, 40), r(24, 40), r(24), "gelu"), {}),
        "mlp_projector": ((r(1, 4, 32), r(32), r(32), r(24, 32), r(24), r(16, 24), r(16), 1e-5), {}),
        "quant_matmul": ((r(3, 64), qweight, scales, qzeros, None, r(32), 4, 32, "gptq"), {}),
        **_w8a8_samples(device, r),
    }


def _w8a8_samples(device, r):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (2, 3, 64), generator=g, dtype=torch.int8).to(device)
    w = torch.randint(-127, 128, (24, 64), generator=g, dtype=torch.int8).to(device)
    sa = (torch.rand(2, 3, generator=g) + 0.01).to(device)
    sw = (torch.rand(24, generator=g) + 0.01).to(device)
    st = torch.tensor([0.02], device=device)
    return {
        "add_rms_norm_quant": ((r(2, 5, 96), r(2, 5, 96), r(96), 1e-6, r(96), "int8", None), {}),
        "add_layer_norm_quant": ((r(2, 5, 96), r(2, 5, 96), r(96), r(96), 1e-6, None, "int8", st), {}),
        "rms_norm_quant": ((r(2, 5, 96), r(96), 1e-6, "int8", None), {}),
        "layer_norm_quant": ((r(2, 5, 96), r(96), None, 1e-6, "int8", None), {}),
        "quantize_per_token": ((r(2, 5, 96), "int8", None), {}),
        "int8_matmul": ((a, sa, w, sw, r(24), "gelu", torch.bfloat16), {}),
        "int8_matmul_accumulate": ((a[0], w), {}),
    }


def test_every_op_has_a_sample():
    assert set(_samples("cpu")) == set(ops.OPS)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("op", sorted(ops.OPS))
def test_opcheck(op, backend, device):
    args, kwargs = _samples(device)[op]
    with set_backend(backend):
        torch.library.opcheck(getattr(torch.ops.internvl_kernels, op).default, args, kwargs)


@pytest.mark.parametrize("op", sorted(ops.OPS))
def test_fake_tensor_shapes_match_real(op, device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args, kwargs = _samples(device)[op]
    fn = getattr(torch.ops.internvl_kernels, op).default
    real = fn(*args, **kwargs)
    with FakeTensorMode() as mode:
        fargs = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = fn(*fargs, **kwargs)
    real = real if isinstance(real, tuple) else (real,)
    fake = fake if isinstance(fake, tuple) else (fake,)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


def test_meta_tensors_validate_inputs():
    # bad inputs fail at trace time too (the checks run in the fake implementations)
    x = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, torch.empty(9, device="meta"))
    out = ops.rms_norm(x, torch.empty(8, device="meta", dtype=torch.float16))
    assert out.shape == (2, 8) and out.dtype == torch.float32 and out.device.type == "meta"


def test_torch_compile_fullgraph_over_ops(device):
    torch._dynamo.reset()
    x = torch.randn(2, 16, 8, device=device)
    w8, w32, b32 = torch.randn(8, device=device), torch.randn(32, device=device), torch.randn(32, device=device)
    qkv = torch.randn(1, 9, 3 * 128, device=device)
    wq = torch.randn(128, device=device)

    def f(x, qkv):
        h = ops.rms_norm(x, w8, 1e-6)
        r, h = ops.add_rms_norm(h, x, w8, 1e-6, w8)
        p = ops.pixel_shuffle_layer_norm(h, w32, b32, 0.5, "v1")
        a = ops.qk_norm_attention(qkv, wq, wq, 2)
        return p.sum() + a.sum() + r.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with set_backend("triton"):
        got = compiled(x, qkv)
        ref = f(x, qkv)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-4)
