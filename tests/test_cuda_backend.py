"""GPU parity suite over backends {triton, cuda}: every op of the CUDA extension (csrc/) and the Triton kernels,
at InternVL shapes, against the eager references of internvl_kernels.model.functional.

GPU-only (``@pytest.mark.gpu``; skipped with a reason on CPU). The ``cuda`` rows need the extension
(``pip install --no-build-isolation -e .``): they skip with the loader's reason when it is missing, unless
``INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1`` (set by scripts/gpu_cuda_check.sh), which turns a missing extension into a
failure. Every call runs with NaN-poisoned outputs and asserts that the requested backend really launched (for
``cuda``: the extension's kernel, not a fallback), so no row can pass by running something else.
"""
from __future__ import annotations

import os

import pytest
import torch
from _kernel_utils import NORM_TOL, assert_close, assert_flash_rule, assert_no_nan

from internvl_kernels import _backend, ops, set_backend
from internvl_kernels.model import functional as F
from internvl_kernels.ops import _common

pytestmark = pytest.mark.gpu

BACKENDS = ("triton", "cuda")
HALF = (torch.float16, torch.bfloat16)
ALL = (torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEV = "cuda"


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cuda":
        from internvl_kernels.ops import _cuda

        if not _cuda.available():
            msg = _cuda.status()
            if os.environ.get("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "0") not in ("", "0"):
                pytest.fail(msg)
            pytest.skip(msg)
    return name


def run(backend, op, fn, *args, expect=None, **kwargs):
    """``fn(*args)`` under ``backend`` with poisoned outputs; asserts which implementation launched.

    ``expect``: "cuda" / "triton" (default: the backend itself) -- "triton" for the cases the CUDA wrapper routes.
    A CUDA launch is counted as ``cuda:<op>``; Triton wrappers count their own kernels (any name).
    """
    expect = expect or backend
    cuda_before, all_before = _common.launches("cuda:" + op), _common.launches()
    with set_backend(backend), ops.poison_outputs(float("nan")):
        out = fn(*args, **kwargs)
    torch.cuda.synchronize()
    cuda_launched = _common.launches("cuda:" + op) - cuda_before
    other_launched = _common.launches() - all_before - cuda_launched
    if expect == "cuda":
        assert cuda_launched > 0, f"{op}: the CUDA kernel did not run under backend {backend!r}"
        assert _backend.resolve(op, torch.device(DEV)) == "cuda"
    else:
        assert cuda_launched == 0, f"{op}: the CUDA kernel ran but this case should be routed to Triton"
        assert other_launched > 0, f"{op}: no Triton launch under backend {backend!r}"
    return out


def eager(fn, *args, **kwargs):
    with set_backend("eager"):
        return fn(*args, **kwargs)


def rnd(*shape, dtype, scale=1.0):
    return torch.randn(*shape, device=DEV, dtype=dtype) * scale


# ------------------------------------------------------------------------------------------------------- norms
NORM_SHAPES = [(1, 1, 3200), (2, 17, 3200), (1, 97, 12800), (3, 5, 576), (2, 7, 1001), (1, 3, 5001), (1, 2, 40000)]


@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm(backend, shape, dtype):
    x = rnd(*shape, dtype=dtype, scale=3.0)
    w = rnd(shape[-1], dtype=dtype)
    out = run(backend, "rms_norm", ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_rms_norm_misaligned_rows(backend, dtype):
    """Rows that start off a 16-byte boundary (a [.., 3201] buffer sliced to 3200): the narrower vector paths."""
    base = rnd(4, 9, 3201, dtype=dtype)
    x = base[..., 1:]
    w = rnd(3200, dtype=dtype)
    out = run(backend, "rms_norm", ops.rms_norm, x, w, 1e-6)
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("affine", ["wb", "w", "none"])
def test_layer_norm(backend, shape, dtype, affine):
    x = rnd(*shape, dtype=dtype, scale=2.0) + 0.5
    w = rnd(shape[-1], dtype=dtype) if affine != "none" else None
    b = rnd(shape[-1], dtype=dtype) if affine == "wb" else None
    out = run(backend, "layer_norm", ops.layer_norm, x, w, b, 1e-6)
    assert_close(out, F.layer_norm(x, w, b, 1e-6), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("shape", [(2, 17, 3200), (1, 1025, 3200), (2, 7, 1001), (1, 3, 5001)], ids=str)
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("kind", ["rms", "ln"])
def test_add_norm(backend, shape, dtype, with_scale, kind):
    x, res = rnd(*shape, dtype=dtype), rnd(*shape, dtype=dtype, scale=4.0)
    w = rnd(shape[-1], dtype=dtype)
    b = rnd(shape[-1], dtype=dtype)
    s = rnd(shape[-1], dtype=dtype, scale=0.1) if with_scale else None
    if kind == "rms":
        new_res, y = run(backend, "add_rms_norm", ops.add_rms_norm, x, res, w, 1e-6, s)
        ref_res, ref_y = F.add_rms_norm(x, res, w, 1e-6, s)
    else:
        new_res, y = run(backend, "add_layer_norm", ops.add_layer_norm, x, res, w, b, 1e-6, s)
        ref_res, ref_y = F.add_layer_norm(x, res, w, b, 1e-6, s)
    assert_no_nan(new_res, "new_residual")
    # the residual update is elementwise with eager's rounding: bit-exact
    assert torch.equal(new_res, ref_res), f"new_residual differs: max err {(new_res - ref_res).abs().max().item()}"
    assert_close(y, ref_y, **NORM_TOL[dtype])


def test_mixed_dtype_norm_routes_to_triton(backend):
    """fp32 weight with bf16 x promotes to an fp32 output: the CUDA wrapper routes it to Triton."""
    x = rnd(2, 5, 3200, dtype=torch.bfloat16)
    w = rnd(3200, dtype=torch.float32)
    out = run(backend, "rms_norm", ops.rms_norm, x, w, 1e-6, expect="triton")
    assert_close(out, F.rms_norm(x, w, 1e-6), **NORM_TOL[torch.float32])


# ---------------------------------------------------------------------------------------------- pixel shuffle
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C,sf", [(13, 1024, 3200, 0.5), (2, 16, 5, 0.5), (1, 36, 7, 1 / 3), (3, 64, 1024, 0.5)])
def test_pixel_shuffle(backend, B, N, C, sf, version, dtype):
    x = rnd(B, N, C, dtype=dtype)
    out = run(backend, "pixel_shuffle", ops.pixel_shuffle, x, sf, version)
    assert torch.equal(out, F.pixel_shuffle(x, sf, version)), "pixel_shuffle is a pure copy: must be bit-exact"


@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C", [(13, 1024, 3200), (2, 16, 5), (1, 64, 1024)])
def test_pixel_shuffle_layer_norm(backend, B, N, C, version, dtype):
    x = rnd(B, N, C, dtype=dtype, scale=2.0)
    w, b = rnd(4 * C, dtype=dtype), rnd(4 * C, dtype=dtype)
    out = run(backend, "pixel_shuffle_layer_norm", ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,N,C", [(13, 1024, 3200), (2, 16, 8)])
def test_pixel_shuffle_strided_cls_view(backend, B, N, C, version, dtype):
    """The model's input: ``vit_embeds[:, 1:, :]`` (cls dropped), a strided view read in place."""
    full = rnd(B, N + 1, C, dtype=dtype, scale=2.0)
    x = full[:, 1:, :]
    assert not x.is_contiguous()
    w, b = rnd(4 * C, dtype=dtype), rnd(4 * C, dtype=dtype)
    out = run(backend, "pixel_shuffle_layer_norm", ops.pixel_shuffle_layer_norm, x, w, b, 0.5, version, 1e-5)
    assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 0.5, version, 1e-5), **NORM_TOL[dtype])
    out = run(backend, "pixel_shuffle", ops.pixel_shuffle, x, 0.5, version)
    assert torch.equal(out, F.pixel_shuffle(x, 0.5, version))


# ------------------------------------------------------------------------------------------------- projector
@pytest.mark.parametrize("dtype", ALL, ids=IDS.get)
@pytest.mark.parametrize("T,C4,H", [(256, 12800, 5120), (3, 4096, 896), (17, 1000, 512)])
def test_mlp_projector(backend, T, C4, H, dtype):
    x = rnd(1, T, C4, dtype=dtype)
    lw, lb = 1 + rnd(C4, dtype=dtype, scale=0.1), rnd(C4, dtype=dtype, scale=0.1)
    w1, b1 = rnd(H, C4, dtype=dtype, scale=C4**-0.5), rnd(H, dtype=dtype, scale=0.1)
    w2, b2 = rnd(H, H, dtype=dtype, scale=H**-0.5), rnd(H, dtype=dtype, scale=0.1)
    args = (x, lw, lb, w1, b1, w2, b2, 1e-5)
    out = run(backend, "mlp_projector", ops.mlp_projector, *args)
    ref64 = F.mlp_projector(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    assert_flash_rule(out, F.mlp_projector(*args), ref64, dtype, what="mlp_projector", factor=2.0)


def test_bias_gelu_epilogue_direct():
    """The epilogue kernel alone: exact erf GELU of (y + bias) in fp32, rounded once."""
    from internvl_kernels.ops import _cuda

    if not _cuda.available():
        pytest.skip(_cuda.status())
    for dtype in ALL:
        y = rnd(33, 520, dtype=dtype, scale=3.0)
        b = rnd(520, dtype=dtype)
        want = torch.nn.functional.gelu(y.float() + b.float()).to(dtype)
        got = torch.ops.internvl_kernels_cuda.bias_gelu_(y.clone(), b)
        assert_close(got, want, **NORM_TOL[dtype])  # fp32 math identical up to FMA contraction: <= 1 ulp


# ------------------------------------------------------------------------------------------------- attention
def _att_inputs(B, Sq, Skv, H, D, dtype):
    return rnd(B, Sq, H, D, dtype=dtype), rnd(B, Skv, H, D, dtype=dtype), rnd(B, Skv, H, D, dtype=dtype)


def _att_check(backend, q, k, v, scale=None, expect=None):
    out = run(backend, "attention", ops.attention, q, k, v, scale, expect=expect)
    ref64 = F.attention(q.double(), k.double(), v.double(), scale)
    return assert_flash_rule(out, F.attention(q, k, v, scale), ref64, q.dtype)


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("S", [1, 17, 64, 97, 1025])
def test_attention(backend, S, D, dtype):
    _att_check(backend, *_att_inputs(2, S, S, 3, D, dtype))


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_internvit_6b_full(backend, dtype):
    _att_check(backend, *_att_inputs(2, 1025, 1025, 25, 128, dtype))


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("Sq,Skv", [(1, 1025), (97, 17), (130, 64)])
def test_attention_cross_lengths(backend, Sq, Skv, dtype):
    _att_check(backend, *_att_inputs(1, Sq, Skv, 2, 64, dtype), scale=0.3)


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_strided_views_of_packed_qkv(backend, dtype):
    """q/k/v as strided views of one [B, S, 3, H, D] buffer (how a model hands them over): no copies needed."""
    qkv = rnd(2, 97, 3, 4, 128, dtype=dtype)
    q, k, v = qkv.unbind(2)
    _att_check(backend, q, k, v)


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
def test_attention_large_logits_are_stable(backend, dtype):
    q, k, v = _att_inputs(1, 200, 200, 2, 64, dtype)
    _att_check(backend, q * 8, k * 8, v)


def test_attention_fp32_routes_to_triton(backend):
    _att_check(backend, *_att_inputs(1, 33, 33, 2, 64, torch.float32), expect="triton")


def test_attention_head_dim_error_is_clear():
    from internvl_kernels.ops import _cuda

    if not _cuda.available():
        pytest.skip(_cuda.status())
    q = rnd(1, 8, 2, 96, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        torch.ops.internvl_kernels_cuda.attention(q, q, q, None)


# ----------------------------------------------------------------------------------------- qk_norm_attention
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("B,S,C,H", [(2, 1025, 3200, 25), (1, 17, 256, 4), (2, 97, 512, 4), (1, 1, 128, 2)])
def test_qk_norm_attention(backend, B, S, C, H, dtype):
    qkv = rnd(B, S, 3 * C, dtype=dtype, scale=2.0)
    qw, kw = 1 + rnd(C, dtype=dtype, scale=0.2), 1 + rnd(C, dtype=dtype, scale=0.2)
    out = run(backend, "qk_norm_attention", ops.qk_norm_attention, qkv, qw, kw, H, 1e-6, None)
    ref64 = F.qk_norm_attention(qkv.double(), qw.double(), kw.double(), H, 1e-6)
    assert_flash_rule(out, F.qk_norm_attention(qkv, qw, kw, H, 1e-6), ref64, dtype)


def test_qk_norm_attention_fp32_routes_to_triton(backend):
    qkv = rnd(1, 17, 3 * 256, dtype=torch.float32)
    qw, kw = rnd(256, dtype=torch.float32), rnd(256, dtype=torch.float32)
    out = run(backend, "qk_norm_attention", ops.qk_norm_attention, qkv, qw, kw, 4, 1e-6, None, expect="triton")
    ref64 = F.qk_norm_attention(qkv.double(), qw.double(), kw.double(), 4, 1e-6)
    assert_flash_rule(out, F.qk_norm_attention(qkv, qw, kw, 4, 1e-6), ref64, torch.float32)


# ------------------------------------------------------------------------------------------------ quant_matmul
def _qmm_case(K, N, bits, layout, act, dtype, M, bias):
    from test_quant_matmul import make_quant

    q = make_quant(K, N, bits, 128, layout, act_order=act, device=DEV)
    x = rnd(M, K, dtype=dtype)
    b = rnd(N, dtype=dtype, scale=0.1) if bias else None
    return q, x, b


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("layout", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 32])
def test_quant_matmul(backend, M, act, bits, layout, dtype):
    from test_quant_matmul import check_against_reference

    K, N = 3200, 1024  # InternViT's K; full widths in test_quant_matmul_llm_shapes (the CPU reference is fp64)
    q, x, b = _qmm_case(K, N, bits, layout, act, dtype, M, bias=(M % 2 == 1))
    from internvl_kernels.ops._cuda import QUANT_MATMUL_MAX_M

    y = run(backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits,
            128, layout, bias=b, expect=None if M <= QUANT_MATMUL_MAX_M else "triton")
    check_against_reference(y, x, q, bits, 128, layout, bias=b, what=f"{backend} M={M}")


@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("K,gs", [(1024, 32), (1040, -1), (1040, 16), (1040, 64), (1088, 64), (2048, 256)], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_matmul_group_sizes_and_k_tails(backend, K, gs, bits, dtype):
    """group_size % 64 == 0 takes the exact-integer path, others the general one (g_idx built by the binding);
    K % 64 != 0 leaves a partial last chunk in both."""
    from test_quant_matmul import check_against_reference, make_quant

    q = make_quant(K, 256, bits, gs, "gptq_v2", device=DEV)
    x = rnd(5, K, dtype=dtype)
    y = run(backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], None, bits, gs,
            "gptq_v2")
    check_against_reference(y, x, q, bits, gs, "gptq_v2", what=f"{backend} K={K} gs={gs}")


@pytest.mark.parametrize("KN", [(5120, 13824), (13824, 5120), (6144, 6144), (12800, 3200)], ids=str)
@pytest.mark.parametrize("M", [1, 16, 128])
def test_quant_matmul_llm_shapes(backend, KN, M):
    """W4 GEMM at the LLM widths (LLaMA2-13B MLP, InternLM2-20B hidden) and InternViT-6B fc2, decode to prefill M."""
    from test_quant_matmul import check_against_reference

    from internvl_kernels.ops._cuda import QUANT_MATMUL_MAX_M

    K, N = KN
    q, x, _ = _qmm_case(K, N, 4, "gptq", False, torch.bfloat16, M, bias=False)
    y = run(backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], None, 4, 128, "gptq",
            expect=None if M <= QUANT_MATMUL_MAX_M else "triton")
    check_against_reference(y, x, q, 4, 128, "gptq", what=f"{backend} {KN} M={M}")


@pytest.mark.parametrize("case", ["awq", "bits3", "large_m"])
def test_quant_matmul_uncovered_cases_route_to_triton(backend, case):
    from test_quant_matmul import check_against_reference

    layout, bits, M = {"awq": ("awq", 4, 4), "bits3": ("gptq", 3, 4), "large_m": ("gptq", 4, 200)}[case]
    q, x, _ = _qmm_case(1024, 512, bits, layout, False, torch.float16, M, bias=False)
    y = run(backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits,
            128, layout, expect="triton")
    check_against_reference(y, x, q, bits, 128, layout, what=f"{backend} {case}")


def test_quant_matmul_split_k_is_deterministic(backend):
    q, x, _ = _qmm_case(5120, 5120, 4, "gptq", False, torch.bfloat16, 1, bias=False)
    args = (x, q["qweight"], q["scales"], q["qzeros"], None, 4, 128, "gptq")
    y1 = run(backend, "quant_matmul", ops.quant_matmul, *args)
    y2 = run(backend, "quant_matmul", ops.quant_matmul, *args)
    assert torch.equal(y1, y2)
