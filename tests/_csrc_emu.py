"""Driver of the CPU-emulated CUDA kernels (see csrc/test/ik_emu.h and tests/test_csrc_emulation.py).

``python tests/_csrc_emu.py LIB [--shard=i/n] [case-prefix ...]`` loads the emulation library (the csrc/*.cu sources compiled as C++ with
-DIK_EMULATION, normally with AddressSanitizer), runs every case of :data:`CASES` through the kernels' real
launchers on CPU tensors and prints one JSON line per case: ``{"case": name, "ok": bool, "detail": str}``.
Every check compares against the eager references of internvl_kernels.model.functional (or the quantization
reference); outputs are NaN-poisoned before the launch.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from internvl_kernels.model import functional as F  # noqa: E402

DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NORM_TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
FLASH_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

LIB = None
P = ctypes.c_void_p
I64 = ctypes.c_int64


def ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def load(path):
    global LIB
    LIB = ctypes.CDLL(path)
    LIB.ik_emu_norm.argtypes = [ctypes.c_int, ctypes.c_int, I64, I64, P, I64, P, I64, P, P, P, P, I64, P, I64,
                                ctypes.c_float]
    LIB.ik_emu_pixel_shuffle.argtypes = [ctypes.c_int, ctypes.c_int, I64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                         ctypes.c_int, I64, I64, P, P, P, P, ctypes.c_float]
    LIB.ik_emu_bias_gelu.argtypes = [ctypes.c_int, P, I64, P, I64, I64]
    LIB.ik_emu_qk_rstd.argtypes = [ctypes.c_int, P, I64, I64, I64, ctypes.c_float, P]
    LIB.ik_emu_attention.argtypes = [ctypes.c_int] * 6 + [P, P, P, P, P, ctypes.c_float, P, P, P, P]
    LIB.ik_emu_quant_matmul.argtypes = [ctypes.c_int] * 4 + [I64, I64, I64, P, I64, P, P, P, P, I64, I64, P, P,
                                                             ctypes.c_int]
    LIB.ik_emu_quant_matmul_split_k.argtypes = [I64, I64, I64]


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def check_rc(rc, what):
    assert rc == 0, f"{what}: launcher returned cudaError {rc}"


def assert_close(out, ref, rtol, atol, what):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in output (unwritten element?)"
    err = (out.double() - ref.double()).abs()
    bound = atol + rtol * ref.double().abs()
    bad = ~(err <= bound)
    assert not bad.any(), f"{what}: {int(bad.sum())}/{bad.numel()} out of tolerance, max err {float(err.max()):.3g}"


def flash_rule(out, eager_lp, ref64, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    e_k = float((out.double() - ref64).abs().max())
    e_e = float((eager_lp.double() - ref64).abs().max())
    floor = FLASH_FLOOR[dtype] * max(1.0, float(ref64.abs().max()))
    assert e_k <= 2 * e_e + floor, f"{what}: kernel err {e_k:.3g} > 2 x eager err {e_e:.3g} + {floor:.3g}"
    return e_k, e_e


# ------------------------------------------------------------------------------------------------------ norms
def run_norm(rms, x2, weight, bias=None, residual=None, scale=None, eps=1e-6):
    """x2 [rows, C] (any row stride); returns (residual_out or None, out)."""
    rows, C = x2.shape
    out = poisoned(rows, C, dtype=x2.dtype)
    ro = poisoned(rows, C, dtype=x2.dtype) if residual is not None else None
    rc = LIB.ik_emu_norm(int(rms), DT[x2.dtype], rows, C, ptr(x2), x2.stride(0), ptr(residual),
                         residual.stride(0) if residual is not None else 0, ptr(scale), ptr(weight), ptr(bias),
                         ptr(out), C, ptr(ro), C, eps)
    check_rc(rc, "norm")
    return ro, out


def case_norm(kind, dtype, rows, C, misaligned=False, affine="wb", with_scale=True):
    g = torch.Generator().manual_seed(rows * 131 + C)
    if misaligned:
        base = torch.randn(rows, C + 1, generator=g).to(dtype) * 3
        x = base[:, 1:]
    else:
        x = (torch.randn(rows, C, generator=g) * 3 + 0.5).to(dtype)
    w = torch.randn(C, generator=g).to(dtype) if affine != "none" else None
    b = torch.randn(C, generator=g).to(dtype) if affine == "wb" else None
    rtol, atol = NORM_TOL[dtype]
    if kind == "rms":
        _, out = run_norm(True, x, w)
        assert_close(out, F.rms_norm(x, w, 1e-6), rtol, atol, "rms_norm")
    elif kind == "ln":
        _, out = run_norm(False, x, w, b)
        assert_close(out, F.layer_norm(x, w, b, 1e-6), rtol, atol, "layer_norm")
    else:
        res = (torch.randn(rows, C, generator=g) * 4).to(dtype)
        s = (torch.randn(C, generator=g) * 0.1).to(dtype) if with_scale else None
        if kind == "add_rms":
            ro, out = run_norm(True, x, w, residual=res, scale=s)
            ref_r, ref_y = F.add_rms_norm(x, res, w, 1e-6, s)
        else:
            ro, out = run_norm(False, x, w, b, residual=res, scale=s)
            ref_r, ref_y = F.add_layer_norm(x, res, w, b, 1e-6, s)
        assert torch.equal(ro, ref_r), f"new_residual not bit-exact: max err {float((ro - ref_r).abs().max())}"
        assert_close(out, ref_y, rtol, atol, kind)


# ---------------------------------------------------------------------------------------------- pixel shuffle
def case_shuffle(dtype, B, N, C, r, version, ln, view="contiguous"):
    """``view``: "contiguous"; "cls" — the tokens after a leading cls token, ``x_full[:, 1:, :]`` (read in place
    through its strides, as the model passes ``vit_embeds[:, 1:, :]``); "padded" — tokens ``C + 8`` elements apart."""
    g = torch.Generator().manual_seed(B * N + C)
    if view == "cls":
        x = (torch.randn(B, N + 1, C, generator=g) * 2).to(dtype)[:, 1:, :]
    elif view == "padded":
        x = (torch.randn(B, N, C + 8, generator=g) * 2).to(dtype)[:, :, :C]
    else:
        x = (torch.randn(B, N, C, generator=g) * 2).to(dtype)
    assert x.stride(2) == 1 and (view != "padded" or not x.is_contiguous())
    assert view != "cls" or x.storage_offset() == C  # the tokens start one (cls) token into the buffer
    side = math.isqrt(N)
    cout = C * r * r
    out = poisoned(B, N // (r * r), cout, dtype=dtype)
    w = torch.randn(cout, generator=g).to(dtype) if ln else None
    b = torch.randn(cout, generator=g).to(dtype) if ln else None
    ts, bs = (0, 0) if view == "contiguous" else (x.stride(1), x.stride(0))
    rc = LIB.ik_emu_pixel_shuffle(int(ln), DT[dtype], B, side, r, C, int(version == "v2"), ts, bs, ptr(x), ptr(out),
                                  ptr(w), ptr(b), 1e-5)
    check_rc(rc, "pixel_shuffle")
    if ln:
        assert_close(out, F.pixel_shuffle_layer_norm(x, w, b, 1 / r, version, 1e-5), *NORM_TOL[dtype],
                     "pixel_shuffle_layer_norm")
    else:
        assert torch.equal(out, F.pixel_shuffle(x, 1 / r, version)), "pixel_shuffle not bit-exact"


def case_bias_gelu(dtype, rows, cols):
    g = torch.Generator().manual_seed(rows + cols)
    y = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
    b = torch.randn(cols, generator=g).to(dtype)
    want = torch.nn.functional.gelu(y.float() + b.float()).to(dtype)
    got = y.clone()
    check_rc(LIB.ik_emu_bias_gelu(DT[dtype], ptr(got), cols, ptr(b), rows, cols), "bias_gelu")
    assert_close(got, want, *NORM_TOL[dtype], "bias_gelu")


# -------------------------------------------------------------------------------------------------- attention
def run_attention(q, k, v, scale=None, qk=None):
    B, S, H, D = q.shape
    SK = k.shape[1]
    out = poisoned(B, S, H, D, dtype=q.dtype)
    strides = (ctypes.c_int64 * 12)(*[t.stride(d) for t in (q, k, v, out) for d in range(3)])
    scale = D ** -0.5 if scale is None else scale
    q_rstd = k_rstd = qw = kw = None
    if qk is not None:
        q_rstd, k_rstd, qw, kw = qk
    rc = LIB.ik_emu_attention(DT[q.dtype], B, S, SK, H, D, ptr(q), ptr(k), ptr(v), ptr(out),
                              ctypes.cast(strides, P), scale, ptr(q_rstd), ptr(k_rstd), ptr(qw), ptr(kw))
    check_rc(rc, "attention")
    return out


def case_attention(dtype, B, S, SK, H, D, packed=False, scale=None, amp=1.0):
    g = torch.Generator().manual_seed(B * 1000 + S * 10 + SK + D)
    if packed:  # strided views of one [B, S, 3, H, D] buffer
        assert S == SK
        qkv = (torch.randn(B, S, 3, H, D, generator=g) * amp).to(dtype)
        q, k, v = qkv.unbind(2)
    else:
        q = (torch.randn(B, S, H, D, generator=g) * amp).to(dtype)
        k = (torch.randn(B, SK, H, D, generator=g) * amp).to(dtype)
        v = torch.randn(B, SK, H, D, generator=g).to(dtype)
    out = run_attention(q, k, v, scale)
    ref64 = F.attention(q.double(), k.double(), v.double(), scale)
    eager = F.attention(q.float(), k.float(), v.float(), scale).to(dtype)  # the dtype's own rounding of the output
    return flash_rule(out, eager, ref64, dtype, "attention")


def case_qk_norm_attention(dtype, B, S, C, H):
    g = torch.Generator().manual_seed(B * 100 + S + C)
    D = C // H
    qkv = (torch.randn(B, S, 3 * C, generator=g) * 2).to(dtype)
    qw = (1 + 0.2 * torch.randn(C, generator=g)).to(dtype)
    kw = (1 + 0.2 * torch.randn(C, generator=g)).to(dtype)
    rstd = poisoned(2, B * S, dtype=torch.float32)
    check_rc(LIB.ik_emu_qk_rstd(DT[dtype], ptr(qkv), B * S, 3 * C, C, 1e-6, ptr(rstd)), "qk_rstd")
    qf = qkv[..., :C].float()
    kf = qkv[..., C:2 * C].float()
    want_q = torch.rsqrt(qf.pow(2).mean(-1) + 1e-6).reshape(-1)
    want_k = torch.rsqrt(kf.pow(2).mean(-1) + 1e-6).reshape(-1)
    assert_close(rstd[0], want_q, 1e-6, 0, "q rstd")
    assert_close(rstd[1], want_k, 1e-6, 0, "k rstd")
    q = qkv[..., :C].reshape(B, S, H, D)
    k = qkv[..., C:2 * C].reshape(B, S, H, D)
    v = qkv[..., 2 * C:].reshape(B, S, H, D)
    out = run_attention(q, k, v, None, qk=(rstd[0], rstd[1], qw, kw)).reshape(B, S, C)
    ref64 = F.qk_norm_attention(qkv.double(), qw.double(), kw.double(), H, 1e-6)
    # eager in the dtype's rounding of the normalized q/k (the kernel reproduces it), fp32 attention math
    qn = F.rms_norm(qkv[..., :C], qw, 1e-6).float().reshape(B, S, H, D)
    kn = F.rms_norm(qkv[..., C:2 * C], kw, 1e-6).float().reshape(B, S, H, D)
    eager = F.attention(qn, kn, v.float()).to(dtype).reshape(B, S, C)
    return flash_rule(out, eager, ref64, dtype, "qk_norm_attention")


# ----------------------------------------------------------------------------------------------- quant_matmul
def case_quant_matmul(dtype, bits, layout, act, M, K, N, gs, bias=False, split=0, scales_fp32=False):
    from internvl_kernels.quant import formats as fm

    from internvl_kernels.quant import quant_matmul_reference

    g = torch.Generator().manual_seed(M * 7 + K + N + bits + gs)
    G = -(-K // gs)
    iw = torch.randint(0, 2**bits, (N, K), generator=g, dtype=torch.int32)
    zeros = torch.randint(1 if layout == "gptq" else 0, 2**bits, (G, N), generator=g, dtype=torch.int32)
    scales = ((torch.rand(G, N, generator=g) + 0.25) * 2 / (2**bits * math.sqrt(K))).to(torch.float16)
    qweight, qzeros = fm.pack_gptq(iw, zeros, bits, 1 if layout == "gptq" else 2)
    perm = torch.randperm(K, generator=g) if act else None
    g_idx = fm.make_g_idx(K, gs, perm=perm) if act else None
    x = torch.randn(M, K, generator=g).to(dtype)
    b = (torch.randn(N, generator=g) * 0.1).to(dtype) if bias else None
    ref = quant_matmul_reference(x, qweight, scales, qzeros, g_idx, bits, gs, layout, bias=b)
    # the binding: explicit g_idx for group sizes the exact-integer path cannot take
    gi = g_idx if g_idx is not None else (None if gs % 64 == 0 else (torch.arange(K, dtype=torch.int32) // gs))
    sc = scales.float() if scales_fp32 else scales
    out = poisoned(M, N, dtype=dtype)
    bf = b.float() if b is not None else None
    rc = LIB.ik_emu_quant_matmul(DT[dtype], DT[sc.dtype], bits, 1 if layout == "gptq" else 0, M, K, N, ptr(x), K,
                                 ptr(qweight), ptr(sc), ptr(qzeros), ptr(gi), gs, G, ptr(bf), ptr(out), split)
    check_rc(rc, "quant_matmul")
    assert not torch.isnan(out).any(), "quant_matmul: NaN in output"
    err = (out.double() - ref.double()).norm()
    sqnr = float(20 * torch.log10(ref.double().norm() / err.clamp_min(1e-300)))
    # weights rounded to the dtype (general path) or exact (integer path) + output rounding
    floor = {torch.float16: 55.0, torch.bfloat16: 40.0}[dtype]
    assert sqnr >= floor, f"quant_matmul SQNR {sqnr:.1f} dB < {floor}"
    return sqnr


# ------------------------------------------------------------------------------------------------------- cases
def build_cases():
    cases = {}
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        n = NAMES[dt]
        for rows, C in ((3, 3200), (2, 1001), (1, 5001), (1, 40000), (4, 576)):
            cases[f"rms_norm-{n}-{rows}x{C}"] = (case_norm, ("rms", dt, rows, C))
            cases[f"layer_norm-{n}-{rows}x{C}"] = (case_norm, ("ln", dt, rows, C))
        cases[f"rms_norm-{n}-misaligned"] = (case_norm, ("rms", dt, 3, 3200, True))
        cases[f"layer_norm-{n}-noaffine"] = (case_norm, ("ln", dt, 2, 640, False, "none"))
        cases[f"layer_norm-{n}-weightonly"] = (case_norm, ("ln", dt, 2, 1001, False, "w"))
        for rows, C in ((3, 3200), (2, 1001), (1, 5001)):
            cases[f"add_rms_norm-{n}-{rows}x{C}"] = (case_norm, ("add_rms", dt, rows, C))
            cases[f"add_layer_norm-{n}-{rows}x{C}"] = (case_norm, ("add_ln", dt, rows, C))
        cases[f"add_rms_norm-{n}-noscale"] = (case_norm, ("add_rms", dt, 2, 3200, False, "wb", False))
        for (B, N, C, r) in ((2, 16, 5, 2), (1, 36, 7, 3), (1, 64, 24, 2), (2, 16, 40, 2)):
            for version in ("v1", "v2"):
                cases[f"pixel_shuffle-{n}-{B}x{N}x{C}-r{r}-{version}"] = (case_shuffle, (dt, B, N, C, r, version, False))
                cases[f"pixel_shuffle_layer_norm-{n}-{B}x{N}x{C}-r{r}-{version}"] = (
                    case_shuffle, (dt, B, N, C, r, version, True))
        for (B, N, C, r) in ((2, 16, 8, 2), (1, 64, 24, 2), (2, 36, 5, 3)):
            for view in ("cls", "padded"):
                cases[f"pixel_shuffle-{n}-{B}x{N}x{C}-r{r}-{view}"] = (case_shuffle, (dt, B, N, C, r, "v2", False, view))
                cases[f"pixel_shuffle_layer_norm-{n}-{B}x{N}x{C}-r{r}-{view}"] = (
                    case_shuffle, (dt, B, N, C, r, "v1", True, view))
        cases[f"bias_gelu-{n}"] = (case_bias_gelu, (dt, 5, 40))
        cases[f"bias_gelu-{n}-odd"] = (case_bias_gelu, (dt, 3, 37))
    for dt in (torch.float16, torch.bfloat16):
        n = NAMES[dt]
        for D in (64, 128):
            for (B, S, SK, H) in ((1, 1, 1, 1), (1, 17, 17, 2), (1, 64, 64, 1), (1, 65, 65, 1), (2, 97, 97, 1),
                                  (1, 130, 17, 1), (1, 5, 130, 1)):
                cases[f"attention-{n}-D{D}-B{B}-S{S}-SK{SK}-H{H}"] = (case_attention, (dt, B, S, SK, H, D))
            cases[f"attention-{n}-D{D}-packed"] = (case_attention, (dt, 2, 33, 33, 2, D, True))
        cases[f"attention-{n}-large-logits"] = (case_attention, (dt, 1, 70, 70, 1, 64, False, None, 6.0))
        cases[f"attention-{n}-scale"] = (case_attention, (dt, 1, 40, 40, 1, 64, False, 0.3))
        for (B, S, C, H) in ((1, 33, 256, 4), (1, 70, 256, 2), (2, 17, 128, 2), (1, 1, 128, 2)):
            cases[f"qk_norm_attention-{n}-B{B}-S{S}-C{C}-H{H}"] = (case_qk_norm_attention, (dt, B, S, C, H))
        for bits in (4, 8):
            for layout in ("gptq", "gptq_v2"):
                for act in (False, True):
                    for M in (1, 16):
                        cases[f"quant_matmul-{n}-{layout}-w{bits}-{'act' if act else 'nat'}-M{M}"] = (
                            case_quant_matmul, (dt, bits, layout, act, M, 256, 64, 128, M == 1))
            cases[f"quant_matmul-{n}-w{bits}-gs32-M5"] = (case_quant_matmul, (dt, bits, "gptq_v2", False, 5, 256, 64, 32))
            cases[f"quant_matmul-{n}-w{bits}-K272-gs64"] = (case_quant_matmul, (dt, bits, "gptq_v2", False, 3, 272, 64, 64))
            cases[f"quant_matmul-{n}-w{bits}-K272-gs16"] = (case_quant_matmul, (dt, bits, "gptq", False, 2, 272, 32, 16))
            cases[f"quant_matmul-{n}-w{bits}-splitk3-bias"] = (
                case_quant_matmul, (dt, bits, "gptq", False, 4, 1536, 64, 128, True, 3))
            cases[f"quant_matmul-{n}-w{bits}-scales-fp32"] = (
                case_quant_matmul, (dt, bits, "gptq", True, 2, 256, 64, 64, False, 0, True))
    return cases


CASES = build_cases()


def main(argv):
    load(argv[1])
    rest = argv[2:]
    shard, nshards = 0, 1
    if rest and rest[0].startswith("--shard="):
        shard, nshards = (int(v) for v in rest.pop(0).split("=", 1)[1].split("/"))
    only = set(rest)
    for i, (name, (fn, args)) in enumerate(CASES.items()):
        if i % nshards != shard:
            continue
        if only and not any(name.startswith(o) for o in only):
            continue
        t0 = time.perf_counter()
        try:
            info = fn(*args)
            print(json.dumps({"case": name, "ok": True, "detail": repr(info),
                              "secs": round(time.perf_counter() - t0, 3)}), flush=True)
        except Exception as e:  # noqa: BLE001 - reported per case
            print(json.dumps({"case": name, "ok": False,
                              "detail": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
