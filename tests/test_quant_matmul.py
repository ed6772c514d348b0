"""quant_matmul: Triton kernels (split-K decode + tiled GEMM) vs the eager dequantize + matmul reference.

Every layout × bits × dtype × act-order, odd M, reduced InternViT / LLM shapes on the CPU (Triton interpreter), full
shapes on a GPU. Error metrics against the fp32 reference output: SQNR thresholds plus an elementwise bound derived
from the dtype's rounding (``2 ulp(out) + (u_w + K·2⁻²⁴)·Σ|x||w|``), never allclose alone; outputs are poisoned with
NaN before the kernels write them, and NaN never passes.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _parity import DEV, HALF, IDS, gpu_backend, parity_run, rnd  # noqa: F401 (gpu_backend is a fixture)

from internvl_kernels import ops

import internvl_kernels
from internvl_kernels import _backend
from internvl_kernels.ops import _common
from internvl_kernels.ops.quant_matmul import SPLITK_MAX_M, quant_matmul, quant_matmul_triton
from internvl_kernels.quant import dequantize, quant_matmul_reference
from internvl_kernels.quant import formats as fm

HAS_CUDA = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DT_IDS = ("fp32", "fp16", "bf16")
# minimum SQNR (dB) of the kernel output vs the fp32 reference output; the output rounding alone gives ~ 6.02·p dB
# (fp32 p=24, fp16 11, bf16 8 — the interpreter truncates bf16 stores: one bit less)
SQNR_MIN = {torch.float32: 110.0, torch.float16: 55.0, torch.bfloat16: 38.0}
# unit roundoff of the dequantized weight when the GEMM kernel rounds it to the activation dtype
U_W = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

CASES = [(layout, bits) for layout in ("gptq", "gptq_v2") for bits in (2, 3, 4, 8)] + [("awq", 4)]
# (layout, bits, act_order): act-order only exists for the GPTQ layouts (AWQ has no g_idx)
FORMAT_CASES = [(lay, b, act) for lay, b in CASES for act in ((False, True) if lay != "awq" else (False,))]


def make_quant(K: int, N: int, bits: int, group_size: int, layout: str, act_order: bool = False, seed: int = 0,
               device="cpu", scale: float = 1.0):
    """Random codes / zeros / fp16 scales packed with internvl_kernels.quant.formats (the interop test checks the packing itself).

    Scales are sized so that ``x @ W.T`` with unit-variance ``x`` is O(scale): the matmul, not the bias, carries the
    signal the SQNR measures."""
    g = torch.Generator().manual_seed(seed)
    gs = K if group_size == -1 else group_size
    G = -(-K // gs)
    iw = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    zlo = 1 if layout == "gptq" else 0  # GPTQ v1 cannot store a zero of 0
    zeros = torch.randint(zlo, 2**bits, (G, N), generator=g, dtype=torch.int32)
    scales = ((torch.rand(G, N, generator=g) + 0.25) * 2 * scale / (2**bits * math.sqrt(K))).to(torch.float16)
    if layout == "awq":
        qweight, qzeros = fm.pack_awq(iw, zeros, bits)
        g_idx = None
    else:
        qweight, qzeros = fm.pack_gptq(iw, zeros, bits, 1 if layout == "gptq" else 2)
        perm = torch.randperm(K, generator=g) if act_order else None
        g_idx = fm.make_g_idx(K, group_size, perm=perm) if act_order else None
    t = dict(qweight=qweight, scales=scales, qzeros=qzeros, g_idx=g_idx)
    return {k: (v.to(device) if v is not None else None) for k, v in t.items()}


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref.double()).norm()
    sig = ref.double().norm()
    if not torch.isfinite(err):
        return -math.inf
    return float(20 * torch.log10(sig / err.clamp_min(1e-300)))


def check_against_reference(y, x, q, bits, gs, layout, bias=None, what=""):
    """SQNR + elementwise bound vs the fp32 reference output; y must be finite and in x's dtype."""
    dtype = x.dtype
    assert y.dtype == dtype and y.shape[:-1] == x.shape[:-1], f"{what}: got {y.dtype} {tuple(y.shape)}"
    assert torch.isfinite(y).all(), f"{what}: non-finite output (unwritten poisoned element or overflow)"
    # fp64 reference on the tensors' own device (full GPU shapes would take minutes in fp64 on the CPU)
    w = dequantize(q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits, gs, layout).double()
    xd = x.detach().double().reshape(-1, x.shape[-1])
    ref = xd @ w.t()
    if bias is not None:
        ref = ref + bias.double()
    yd = y.detach().double().reshape(ref.shape)
    s = sqnr_db(yd, ref)
    assert s >= SQNR_MIN[dtype], f"{what}: SQNR {s:.1f} dB < {SQNR_MIN[dtype]} dB"
    K = x.shape[-1]
    absmat = xd.abs() @ w.abs().t()
    bound = 2 * ULP[dtype] * ref.abs() + (U_W[dtype] + K * 2.0**-24) * absmat + 1e-30
    if dtype == torch.float16:
        bound = bound + 2.0**-24 * 2  # subnormal floor
    err = (yd - ref).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{bad.numel()} elements beyond the rounding bound; worst "
                           f"err {float((err - bound).max()):.3g} over bound")
    return s


def run_triton(fn, *args, **kwargs):
    """Run with NaN-poisoned outputs and prove a Triton kernel launched."""
    before = _common.launches("quant_matmul")
    with _common.poison_outputs(float("nan")):
        out = fn(*args, **kwargs)
    assert _common.launches("quant_matmul") > before, "no Triton launch happened"
    return out


# ----------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("layout,bits,act_order", FORMAT_CASES,
                         ids=[f"{lay}-{b}b-{'act' if a else 'nat'}" for lay, b, a in FORMAT_CASES])
@pytest.mark.parametrize("kernel", ["splitk", "gemm"])
def test_kernel_parity_every_format(device, kernel, layout, bits, act_order, dtype):
    K, N, M, gs = 256, 64, 5, 64
    q = make_quant(K, N, bits, gs, layout, act_order, seed=bits, device=device)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = (0.1 * torch.randn(N, device=device)).to(dtype)
    y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bias, bits, gs,
                   layout, kernel=kernel)
    check_against_reference(y, x, q, bits, gs, layout, bias, what=f"{kernel} {layout} {bits}b {dtype}")


@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("layout,bits,act", [("gptq", 4, False), ("gptq", 4, True), ("awq", 4, False),
                                             ("gptq_v2", 8, True)])
def test_odd_m_through_the_public_op(device, M, dtype, layout, bits, act):
    """The public op picks the kernel by M (split-K for M ≤ 32, GEMM above) and flattens [..., K]."""
    K, N, gs = 128, 96, 32
    q = make_quant(K, N, bits, gs, layout, act, seed=M, device=device)
    x = torch.randn(1, M, K, device=device).to(dtype)
    with internvl_kernels.set_backend("triton"):
        assert _backend.resolve("quant_matmul", x.device) == "triton"
        y = run_triton(quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits, gs, layout)
    assert y.shape == (1, M, N)
    check_against_reference(y, x, q, bits, gs, layout, what=f"M={M} {layout}")


@pytest.mark.parametrize("kernel", ["splitk", "gemm"])
@pytest.mark.parametrize("group_size", [-1, 16, 48, 128])
def test_group_sizes(device, kernel, group_size):
    """One group, groups smaller than / not dividing the K-tile (gather path), a partial last group (K=272)."""
    K, N = 272, 32
    bits = 4
    q = make_quant(K, N, bits, group_size, "gptq_v2", seed=abs(group_size), device=device)
    x = torch.randn(4, K, device=device)
    y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], None, None, bits, group_size,
                   "gptq_v2", kernel=kernel)
    check_against_reference(y, x, q, bits, group_size, "gptq_v2", what=f"gs={group_size}")


@pytest.mark.parametrize("split_k", [1, 3, 8])
def test_split_k_reduction_is_deterministic(device, split_k):
    K, N, bits, gs = 512, 64, 4, 128
    q = make_quant(K, N, bits, gs, "gptq", device=device)
    x = torch.randn(2, K, device=device).to(torch.bfloat16)
    b = 0.1 * torch.randn(N, device=device)
    args = (x, q["qweight"], q["scales"], q["qzeros"], None, b, bits, gs, "gptq")
    y1 = run_triton(quant_matmul_triton, *args, kernel="splitk", split_k=split_k)
    y2 = run_triton(quant_matmul_triton, *args, kernel="splitk", split_k=split_k)
    assert torch.equal(y1, y2)
    check_against_reference(y1, x, q, bits, gs, "gptq", b, what=f"split_k={split_k}")


@pytest.mark.parametrize("shape", [(3200, 96), (1280, 80)], ids=["internvit_K3200", "llm_K1280"])
@pytest.mark.parametrize("M,kernel", [(1, "splitk"), (40, "gemm")])
def test_reduced_model_shapes(device, shape, M, kernel):
    """InternViT's real width K=3200 (not a power of two, 25 groups of 128) and an LLM-like K, reduced N."""
    K, N = shape
    q = make_quant(K, N, 4, 128, "gptq", act_order=False, device=device)
    x = torch.randn(M, K, device=device).to(torch.bfloat16)
    y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], None, None, 4, 128, "gptq",
                   kernel=kernel)
    check_against_reference(y, x, q, 4, 128, "gptq", what=f"{shape} M={M}")


@pytest.mark.parametrize("kernel", ["splitk", "gemm"])
def test_bf16_large_activations_do_not_overflow(device, kernel):
    """ViT-range activations: outputs far beyond fp16's 65504 stay finite and accurate in bf16 (no fp16 detour)."""
    K, N = 256, 64
    q = make_quant(K, N, 4, 64, "awq", device=device, scale=10.0)
    x = (torch.randn(3, K, device=device) * 3e4).to(torch.bfloat16)
    y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], None, None, 4, 64, "awq",
                   kernel=kernel)
    ref = quant_matmul_reference(x.float(), q["qweight"], q["scales"], q["qzeros"], None, 4, 64, "awq")
    assert ref.abs().max() > 1e5, "the test must exceed fp16's range to mean anything"
    check_against_reference(y, x, q, 4, 64, "awq", what="large bf16")


def test_eager_reference_matches_dense_linear():
    """The eager path is dequantize → F.linear in fp32 → x.dtype (and accepts fp32 inputs)."""
    K, N = 96, 32
    q = make_quant(K, N, 3, 32, "gptq", act_order=True)
    x = torch.randn(2, 3, K)
    b = torch.randn(N)
    with internvl_kernels.set_backend("eager"):
        y = quant_matmul(x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], 3, 32, "gptq", bias=b)
    w = fm.dequantize_gptq(q["qweight"], q["qzeros"], q["scales"], q["g_idx"], 3, 1, dtype=torch.float32)
    assert torch.equal(y, F.linear(x, w, b))


def test_empty_batch(device):
    q = make_quant(64, 32, 4, 32, "gptq", device=device)
    x = torch.randn(0, 64, device=device, dtype=torch.float16)
    for backend in ("eager", "triton"):
        with internvl_kernels.set_backend(backend):
            y = quant_matmul(x, q["qweight"], q["scales"], q["qzeros"], None, 4, 32, "gptq")
        assert y.shape == (0, 32) and y.dtype == torch.float16


def test_nan_input_propagates_not_hidden(device):
    """NaN in the activations must show up in the output (a kernel must not mask it away)."""
    q = make_quant(64, 32, 4, 32, "gptq", device=device)
    x = torch.randn(2, 64, device=device)
    x[1, 5] = float("nan")
    y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], None, None, 4, 32, "gptq",
                   kernel="gemm")
    assert torch.isfinite(y[0]).all() and torch.isnan(y[1]).any()


# ------------------------------------------------------------------------------------------------- validation
def _args(**over):
    q = make_quant(64, 32, 4, 32, "gptq")
    a = dict(x=torch.randn(2, 64), qweight=q["qweight"], scales=q["scales"], qzeros=q["qzeros"], g_idx=None, bits=4,
             group_size=32, layout="gptq")
    a.update(over)
    return a


@pytest.mark.parametrize("over,exc,msg", [
    (dict(layout="marlin"), ValueError, "layout must be one of"),
    (dict(bits=5), ValueError, "bits must be one of"),
    (dict(layout="awq"), ValueError, "qweight has shape"),
    (dict(x=torch.randn(2, 64).to(torch.int32)), TypeError, "x has dtype"),
    (dict(qweight=torch.zeros(8, 32, dtype=torch.int64)), TypeError, "qweight must be int32"),
    (dict(qzeros=torch.zeros(2, 4, dtype=torch.int16)), TypeError, "qzeros must be int32"),
    (dict(x=torch.randn(2, 72)), ValueError, "qweight has shape"),
    (dict(group_size=16), ValueError, "qzeros has shape"),
    (dict(scales=torch.ones(2, 32, dtype=torch.int32)), TypeError, "scales must be a 2-D float"),
    (dict(g_idx=torch.zeros(63, dtype=torch.int32)), ValueError, r"g_idx must have shape \(64,\)"),
    (dict(g_idx=torch.zeros(64, dtype=torch.float32)), TypeError, "g_idx must be an int32"),
    (dict(group_size=-5), ValueError, "group_size must be positive or -1"),
    (dict(scales=torch.ones(2, 32, dtype=torch.float16, device="meta")), ValueError, "scales is on meta"),
])
def test_bad_inputs_are_named(over, exc, msg):
    with pytest.raises(exc, match=msg):
        quant_matmul(**_args(**over))


def test_bad_inputs_more():
    a = _args()
    with pytest.raises(ValueError, match="must be contiguous"):
        quant_matmul(**{**a, "qweight": torch.zeros(32, 8, dtype=torch.int32).t()})
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        quant_matmul(**a, bias=torch.zeros(31))
    q = make_quant(64, 32, 4, 32, "awq")
    with pytest.raises(ValueError, match="AWQ has no g_idx"):
        quant_matmul(torch.randn(2, 64), q["qweight"], q["scales"], q["qzeros"], torch.zeros(64, dtype=torch.int32),
                     4, 32, "awq")
    with pytest.raises(ValueError, match="AWQ GEMM is 4-bit only"):
        quant_matmul(torch.randn(2, 64), q["qweight"], q["scales"], q["qzeros"], None, 8, 32, "awq")


# ----------------------------------------------------------------------------------------- custom-op mechanics
def test_opcheck_and_fake():
    q = make_quant(64, 32, 4, 32, "gptq", act_order=True)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    args = (x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], torch.randn(32), 4, 32, "gptq")
    for backend in ("eager", "triton"):
        with internvl_kernels.set_backend(backend):
            torch.library.opcheck(torch.ops.internvl_kernels.quant_matmul.default, args)
    with torch.device("meta"):
        xm = torch.empty(5, 64, dtype=torch.float16)
    ym = torch.ops.internvl_kernels.quant_matmul(xm, *(t.to("meta") if t is not None else None for t in args[1:6]),
                                                 4, 32, "gptq")
    assert ym.shape == (5, 32) and ym.dtype == torch.float16 and ym.is_meta


def test_torch_compile_fullgraph_traces():
    q = make_quant(64, 32, 4, 32, "awq")

    def f(x):
        return quant_matmul(x, q["qweight"], q["scales"], q["qzeros"], None, 4, 32, "awq").relu()

    x = torch.randn(4, 64)
    ref = f(x)
    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("KN", [(5120, 13824), (13824, 5120), (5120, 5120), (3200, 9600), (3200, 12800),
                                (12800, 3200)], ids=lambda kn: f"{kn[0]}x{kn[1]}")
def test_full_shapes_gpu(KN):
    """LLaMA2-13B and InternViT-6B Linear shapes, every M of the benchmark, W4 (GPTQ, act-order, AWQ) and W8."""
    K, N = KN
    for bits in (4, 8):
        for layout, act in (("gptq", False), ("gptq", True)) + ((("awq", False),) if bits == 4 else ()):
            q = make_quant(K, N, bits, 128, layout, act, device="cuda")
            for M in (1, 4, 16, 64, 128, 1024):
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                with internvl_kernels.set_backend("triton"):
                    y = run_triton(quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits, 128,
                                   layout)
                check_against_reference(y, x, q, bits, 128, layout, what=f"{K}x{N} M={M} {layout} {bits}b act={act}")


@pytest.mark.gpu
def test_gpu_fp16_and_fp32_and_split_k_determinism():
    K, N = 5120, 5120
    q = make_quant(K, N, 4, 128, "gptq", device="cuda")
    for dtype in (torch.float16, torch.float32):
        for M in (1, 16, 200):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = run_triton(quant_matmul_triton, x, q["qweight"], q["scales"], q["qzeros"], None, None, 4, 128, "gptq")
            check_against_reference(y, x, q, 4, 128, "gptq", what=f"{dtype} M={M}")
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    outs = [quant_matmul_triton(x, q["qweight"], q["scales"], q["qzeros"], None, None, 4, 128, "gptq",
                                kernel="splitk", split_k=8) for _ in range(5)]
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "split-K results differ between runs"
    assert SPLITK_MAX_M >= 16


# ------------------------------------------------------------------------------------- GPU parity: triton, cuda


def _qmm_case(K, N, bits, layout, act, dtype, M, bias):
    q = make_quant(K, N, bits, 128, layout, act_order=act, device=DEV)
    x = rnd(M, K, dtype=dtype)
    b = rnd(N, dtype=dtype, scale=0.1) if bias else None
    return q, x, b


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("layout", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act", [False, True], ids=["natural", "act_order"])
@pytest.mark.parametrize("M", [1, 3, 16, 17, 32])
def test_quant_matmul(gpu_backend, M, act, bits, layout, dtype):
    K, N = 3200, 1024  # InternViT's K; full widths in test_quant_matmul_llm_shapes (the CPU reference is fp64)
    q, x, b = _qmm_case(K, N, bits, layout, act, dtype, M, bias=(M % 2 == 1))
    from internvl_kernels.ops._cuda import QUANT_MATMUL_MAX_M

    y = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits,
            128, layout, bias=b, expect=None if M <= QUANT_MATMUL_MAX_M else "triton")
    check_against_reference(y, x, q, bits, 128, layout, bias=b, what=f"{gpu_backend} M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=IDS.get)
@pytest.mark.parametrize("K,gs", [(1024, 32), (1040, -1), (1040, 16), (1040, 64), (1088, 64), (2048, 256)], ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_quant_matmul_group_sizes_and_k_tails(gpu_backend, K, gs, bits, dtype):
    """group_size % 64 == 0 takes the exact-integer path, others the general one (g_idx built by the binding);
    K % 64 != 0 leaves a partial last chunk in both."""
    q = make_quant(K, 256, bits, gs, "gptq_v2", device=DEV)
    x = rnd(5, K, dtype=dtype)
    y = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], None, bits, gs,
            "gptq_v2")
    check_against_reference(y, x, q, bits, gs, "gptq_v2", what=f"{gpu_backend} K={K} gs={gs}")


@pytest.mark.gpu
@pytest.mark.parametrize("KN", [(5120, 13824), (13824, 5120), (6144, 6144), (12800, 3200)], ids=str)
@pytest.mark.parametrize("M", [1, 16, 128])
def test_quant_matmul_llm_shapes(gpu_backend, KN, M):
    """W4 GEMM at the LLM widths (LLaMA2-13B MLP, InternLM2-20B hidden) and InternViT-6B fc2, decode to prefill M."""
    from internvl_kernels.ops._cuda import QUANT_MATMUL_MAX_M

    K, N = KN
    q, x, _ = _qmm_case(K, N, 4, "gptq", False, torch.bfloat16, M, bias=False)
    y = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], None, 4, 128,
                   "gptq", expect=None if M <= QUANT_MATMUL_MAX_M else "triton")
    check_against_reference(y, x, q, 4, 128, "gptq", what=f"{gpu_backend} {KN} M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["awq", "bits3", "large_m"])
def test_quant_matmul_uncovered_cases_route_to_triton(gpu_backend, case):
    layout, bits, M = {"awq": ("awq", 4, 4), "bits3": ("gptq", 3, 4), "large_m": ("gptq", 4, 200)}[case]
    q, x, _ = _qmm_case(1024, 512, bits, layout, False, torch.float16, M, bias=False)
    y = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, x, q["qweight"], q["scales"], q["qzeros"], q["g_idx"], bits,
            128, layout, expect="triton")
    check_against_reference(y, x, q, bits, 128, layout, what=f"{gpu_backend} {case}")


@pytest.mark.gpu
def test_quant_matmul_split_k_is_deterministic(gpu_backend):
    q, x, _ = _qmm_case(5120, 5120, 4, "gptq", False, torch.bfloat16, 1, bias=False)
    args = (x, q["qweight"], q["scales"], q["qzeros"], None, 4, 128, "gptq")
    y1 = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, *args)
    y2 = parity_run(gpu_backend, "quant_matmul", ops.quant_matmul, *args)
    assert torch.equal(y1, y2)
