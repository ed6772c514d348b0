"""linear (+bias, +exact-GELU epilogue): the Triton GEMM against ``functional.linear``; the selector API."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from _kernel_utils import DTYPE_IDS, DTYPES, assert_flash_rule, run_kernel

from internvl_kernels import ops, options
from internvl_kernels.model import functional as F
from internvl_kernels.options import set_linear_impl

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _linear_ref(x, w, b, act):
    return F.linear(x, w, b, act)


# ------------------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("M,K,N", [(1, 64, 32), (37, 96, 70), (130, 200, 33)], ids=str)
def test_linear_epilogue(M, K, N, dtype, bias, act, device):
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
    b = torch.randn(N, dtype=dtype, device=device) if bias else None
    out = run_kernel(ops.linear, x, w, b, act)
    ref64 = _linear_ref(x.double(), w.double(), None if b is None else b.double(), act)
    assert_flash_rule(out, _linear_ref(x, w, b, act), ref64, dtype)


def test_linear_leading_dims_and_strided_weight(device):
    x = torch.randn(2, 3, 5, 48, device=device)
    wt = torch.randn(48, 40, device=device)
    w = wt.t()  # [40, 48] with a non-unit inner stride: made contiguous by the wrapper
    out = run_kernel(ops.linear, x, w, None, "gelu")
    assert out.shape == (2, 3, 5, 40)
    assert_flash_rule(out, _linear_ref(x, w, None, "gelu"), _linear_ref(x.double(), w.double(), None, "gelu"),
                      torch.float32)


def test_linear_gelu_is_exact_erf(device):
    # tanh-approximate GELU differs from erf GELU by up to ~1e-3 around |x| ~ 2: the kernel must be the erf one
    x = torch.linspace(-4, 4, 64, device=device).view(1, 64).repeat(16, 1)
    w = torch.eye(64, device=device)
    out = run_kernel(ops.linear, x, w, None, "gelu")
    assert (out - TF.gelu(x)).abs().max() < 1e-6
    assert (TF.gelu(x, approximate="tanh") - TF.gelu(x)).abs().max() > 1e-4


def test_linear_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="input features"):
        ops.linear(x, torch.randn(5, 9, device=device))
    with pytest.raises(ValueError, match="activation"):
        ops.linear(x, torch.randn(5, 8, device=device), None, "relu")
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.linear(x, torch.randn(5, 8, device=device), torch.randn(4, device=device))
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.linear(x, torch.randn(5, 8, device=device).half())


def test_linear_eager_backend_is_the_reference(device):
    from internvl_kernels import set_backend

    x, w, b = torch.randn(7, 24, device=device), torch.randn(10, 24, device=device), torch.randn(10, device=device)
    with set_backend("eager"):
        out = ops.linear(x, w, b, "gelu")
    assert torch.equal(out, F.gelu(TF.linear(x, w, b)))


def test_linear_selector_api(monkeypatch):
    assert options.get_linear_impl() in options.LINEAR_IMPLS
    before = options.get_linear_impl()
    with set_linear_impl("cublas"):
        assert options.get_linear_impl() == "cublas"
        with set_linear_impl("triton"):
            assert options.get_linear_impl() == "triton"
        assert options.get_linear_impl() == "cublas"
    assert options.get_linear_impl() == before
    with pytest.raises(ValueError, match="linear impl must be one of"):
        set_linear_impl("fastest")
    assert options.get_linear_impl() == before
    # the environment variable only sets the default, read once, and a bad value names the variable
    monkeypatch.setenv("INTERNVL_KERNELS_LINEAR", "CUBLAS ")
    assert options.env_default("INTERNVL_KERNELS_LINEAR", "auto", options.LINEAR_IMPLS) == "cublas"
    monkeypatch.setenv("INTERNVL_KERNELS_LINEAR", "nope")
    with pytest.raises(ValueError, match="INTERNVL_KERNELS_LINEAR='nope'"):
        options.env_default("INTERNVL_KERNELS_LINEAR", "auto", options.LINEAR_IMPLS)
    assert options.get_linear_impl() == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_linear_triton_kernel_full_shape(dtype, device):
    # force the Triton GEMM (not the cuBLAS fallback) at the ViT fc1 shape and the projector shape
    with set_linear_impl("triton"):
        _full_shapes(dtype, device)


def _full_shapes(dtype, device):
    for M, K, N in ((2 * 1025, 3200, 12800), (2 * 256, 12800, 5120)):
        x = torch.randn(M, K, dtype=dtype, device=device)
        w = torch.randn(N, K, dtype=dtype, device=device) * K ** -0.5
        b = torch.randn(N, dtype=dtype, device=device)
        out = run_kernel(ops.linear, x, w, b, "gelu")
        ref64 = _linear_ref(x.double(), w.double(), b.double(), "gelu")
        assert_flash_rule(out, _linear_ref(x, w, b, "gelu"), ref64, dtype)
