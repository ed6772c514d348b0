"""Compile the GPU kernels for an H100 (sm_90) without a GPU: catches compile errors and shared-memory overflow.

``python -m internvl_kernels.ops.aot_check [--all | --pickable | --w8a8]`` compiles each Triton kernel of
:mod:`internvl_kernels.ops` (the default: one representative configuration per kernel and dtype path; ``--all``: every
autotune configuration that the pruning keeps; ``--pickable``: the attention / linear configurations the autotuners
can pick on the model's dtype paths) through the full Triton → PTX → cubin pipeline (triton bundles ``ptxas``) and checks the
shared memory each one needs against the H100's 227 KB per block, and reports the registers and spill bytes
``ptxas -v`` prints (any spill fails the check: the autotuners' pruning must remove spilling configurations). It
needs ``TRITON_INTERPRET`` unset / 0 (the module sets it to 0 when run as a script, before triton is imported).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time

SMEM_LIMIT = 232448  # bytes of dynamic shared memory one block may use on sm_90


_PTXAS_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_RE = re.compile(r"Used (\d+) registers")


def _compile(fn, ptrs: dict, floats, const: dict, opts: dict, aligned_ints=()):
    """Compile for sm_90; return ``{"shared", "spill_stores", "spill_loads", "regs"}`` (spills / registers from
    ``ptxas -v``, which triton runs: its log is read with ``TRITON_DUMP_PTXAS_LOG`` and the cache bypassed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in aligned_ints:
                attrs[(i,)] = [["tt.divisibility", 16]]
    buf = io.StringIO()
    old = {k: os.environ.get(k) for k in ("TRITON_DUMP_PTXAS_LOG", "TRITON_ALWAYS_COMPILE")}
    os.environ.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    finally:
        for key, v in old.items():
            if v is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = v
    log = buf.getvalue()
    spills = [tuple(map(int, m)) for m in _PTXAS_RE.findall(log)]
    regs = [int(r) for r in _REGS_RE.findall(log)]
    return {"shared": k.metadata.shared, "spill_stores": max((a for a, _ in spills), default=0),
            "spill_loads": max((b for _, b in spills), default=0), "regs": max(regs, default=-1),
            "ptxas_log": bool(spills)}


class _Dtype:
    def __init__(self, dtype):
        self.dtype = dtype


def cases(full: bool = False, pickable: bool = False):
    """Yield ``(name, thunk)``; each thunk compiles one kernel configuration and returns its resource usage.

    ``pickable``: only the attention and linear configurations their autotuners can pick (after pruning) on the
    model's paths (bf16 and fp32; attention D = 64 and 128, with the QK-norm of InternViT-6B at D = 128), each
    compiled as launched (attention with the query-tail program of S = 1025 folded in)."""
    import importlib

    import torch
    import triton.language as tl

    A, L, P, Q, N = (importlib.import_module(f"internvl_kernels.ops.{m}") for m in
                     ("attention", "linear", "pixel_shuffle", "qk_norm_attention", "_norm_kernel"))
    ptr_t = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}
    torch_dt = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float32: torch.float32}

    def attention_case(dt, D, qkn, bmm, bnn, nw, ns):
        ieee = dt == tl.float32
        const = dict(D=D, QK_NORM=qkn, UPCAST=False, IEEE=ieee, DT=dt, BLOCK_M=bmm, BLOCK_N=bnn, TAIL=A.TAIL_N,
                     TAIL_M=16)
        ptrs = {k: ptr_t[dt] for k in ("Q", "K", "V", "O", "WQ", "WK")}
        ptrs["RSTD"] = "*fp32"
        return (f"attention {dt} D={D} qk_norm={qkn} BLOCK_M={bmm} BLOCK_N={bnn} w{nw} s{ns}",
                lambda: _compile(A._attn_fwd_kernel, ptrs, ["qk_scale"], const, {"num_warps": nw, "num_stages": ns},
                                 ("stride_qb", "stride_qs", "stride_kb", "stride_ks", "stride_vb", "stride_vs",
                                  "stride_ob", "stride_os")))

    def linear_case(dt, c):
        const = dict(HAS_BIAS=True, GELU=True, UPCAST=False, IEEE=dt == tl.float32, EVEN_K=True, **c.kwargs)
        return (f"linear {dt} {c.kwargs} w{c.num_warps} s{c.num_stages}",
                lambda: _compile(L._linear_kernel, {k: ptr_t[dt] for k in ("X", "W", "BIAS", "Y")}, [], const,
                                 {"num_warps": c.num_warps, "num_stages": c.num_stages},
                                 ("K", "stride_xm", "stride_wn", "stride_ym")))

    if pickable:
        for dt in (tl.bfloat16, tl.float32):
            bm = A._block_m(torch_dt[dt])
            for D, qkn in ((64, 0), (128, 0), (128, 1)) + (((128, 2),) if dt == tl.bfloat16 else ()):
                for c in A._prune(A._gpu_configs(), {}, IEEE=dt == tl.float32, D=D, QK_NORM=qkn):
                    yield attention_case(dt, D, qkn, bm, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            seen = set()
            for M in (13 * 256, 16):  # large M and the small-M pruning
                for c in L._prune(L._gpu_configs(), {"X": _Dtype(torch_dt[dt]), "M": M}):
                    key = (tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages)
                    if key not in seen:
                        seen.add(key)
                        yield linear_case(dt, c)
        return

    # row norms: RMS + residual (bf16, 3200 ch), LN + residual, RMS 12800 ch, LN fp32, RMS fp16
    for is_rms, res, n, dt in ((True, True, 3200, tl.bfloat16), (False, True, 1024, tl.bfloat16),
                               (True, False, 12800, tl.bfloat16), (False, False, 576, tl.float32),
                               (True, True, 3200, tl.float16)):
        bm, bn, nw = N.launch_settings(n, 13 * 1025)
        const = dict(IS_RMS=is_rms, HAS_RES=res, HAS_SCALE=res, HAS_W=True, HAS_B=not is_rms, PROD_DT=dt, RES_DT=dt,
                     XN_DT=dt, BLOCK_M=bm, BLOCK_N=bn)
        ptrs = {k: ptr_t[dt] for k in ("X", "R", "SCALE", "W", "B", "Y", "RES_OUT")}
        yield (f"norm rms={is_rms} residual={res} N={n} {dt}",
               lambda ptrs=ptrs, const=const, nw=nw: _compile(
                   N._norm_rows_kernel, ptrs, ["eps"], const, {"num_warps": nw, "enable_fp_fusion": False},
                   ("stride_x", "stride_r", "stride_y", "stride_ro")))

    # attention (plain and QK-norm), each autotune config with the small query-tail program folded in
    for dt in (tl.bfloat16, tl.float16, tl.float32):
        ieee = dt == tl.float32
        bm = A._block_m(torch_dt[dt])
        for D in (64, 128):
            for qkn in (0, 1, 2):
                cfgs = A._prune(A._gpu_configs(), {}, IEEE=ieee, D=D, QK_NORM=qkn)
                if not full:
                    if dt == tl.float16 or (ieee and (D == 64 or qkn)) or (D == 64 and qkn == 2):
                        continue
                    cfgs = cfgs[:1]
                for c in cfgs:
                    yield attention_case(dt, D, qkn, bm, c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)

    # GEMM with bias + GELU epilogue
    for dt in (tl.bfloat16, tl.float32):
        cfgs = [c for c in L._gpu_configs() if (dt == tl.float32) == (c.kwargs["BLOCK_K"] == 32)]
        if not full:
            cfgs = cfgs[:1]
        for c in cfgs:
            yield linear_case(dt, c)
    const = dict(HAS_BIAS=False, GELU=False, UPCAST=False, IEEE=False, EVEN_K=False, BLOCK_M=128, BLOCK_N=128,
                 BLOCK_K=64, GROUP_M=8)
    yield ("linear fp16 ragged K, no bias", lambda: _compile(
        L._linear_kernel, {k: "*fp16" for k in ("X", "W", "BIAS", "Y")}, [], const, {"num_warps": 8, "num_stages": 3}))

    yield ("pixel_shuffle", lambda: _compile(P._pixel_shuffle_kernel, {"X": "*bf16", "Y": "*bf16"}, [],
                                             dict(R=2, R2P=4, V2=True, BLOCK_C=2048), {"num_warps": 8}))
    yield ("pixel_shuffle_layer_norm", lambda: _compile(
        P._pixel_shuffle_ln_kernel, {k: "*bf16" for k in ("X", "W", "B", "Y")}, ["eps"],
        dict(HAS_W=True, HAS_B=True, R=2, R2P=4, V2=False, BLOCK_C=4096), {"num_warps": 16}))
    yield ("qk_norm rstd pre-pass", lambda: _compile(Q._qk_rstd_kernel, {"QKV": "*bf16", "RSTD": "*fp32"}, ["eps"],
                                                     dict(BLOCK_M=1, BLOCK_C=4096), {"num_warps": 8}))
    if not pickable:
        yield from w8a8_cases(full)


def w8a8_cases(full: bool = False):
    """The W8A8 kernels: norm + per-token quantization (int8 / fp8, RMS / LN / none, ± residual, static scale) and
    the int8 / fp8 GEMM with each autotune configuration (``full``) or the first one (default)."""
    import importlib

    import triton.language as tl

    NQ = importlib.import_module("internvl_kernels.ops._norm_quant_kernel")
    IM = importlib.import_module("internvl_kernels.ops.int8_matmul")
    ptr_t = {tl.bfloat16: "*bf16", tl.float16: "*fp16", tl.float32: "*fp32"}
    for norm, res, n, dt, fp8, static in (("rms", True, 3200, tl.bfloat16, False, False),
                                          ("rms", True, 3200, tl.bfloat16, True, False),
                                          ("rms", False, 3200, tl.float16, False, True),
                                          ("layer", True, 1024, tl.bfloat16, False, False),
                                          ("none", False, 12800, tl.bfloat16, False, False),
                                          ("none", False, 12800, tl.bfloat16, True, False),
                                          ("none", False, 576, tl.float32, False, True)):
        bm, bn, nw = NQ.launch_settings(n, 13 * 1025)
        const = dict(NORM=NQ.NORM_IDS[norm], HAS_RES=res, HAS_SCALE=res, HAS_W=norm != "none",
                     HAS_B=norm == "layer", STATIC=static, FP8=fp8, PROD_DT=dt, RES_DT=dt, XN_DT=dt, Y_DT=dt,
                     BLOCK_M=bm, BLOCK_N=bn)
        ptrs = {k: ptr_t[dt] for k in ("X", "R", "SCALE", "W", "B", "RES_OUT")}
        ptrs.update(Q="*fp8e4nv" if fp8 else "*i8", QS="*fp32", IN_SCALE="*fp32")
        yield (f"norm_quant norm={norm} residual={res} N={n} {dt} {'fp8' if fp8 else 'int8'} static={static}",
               lambda ptrs=ptrs, const=const, nw=nw: _compile(
                   NQ._norm_quant_kernel, ptrs, ["eps", "amax_floor", "qmax"], const,
                   {"num_warps": nw, "enable_fp_fusion": False}, ("stride_x", "stride_r", "stride_ro", "stride_q")))
    cfgs = IM.gpu_configs()
    for fp8 in (False, True):
        for c in (cfgs if full else cfgs[:1] + [next(c for c in cfgs if IM.keeps_config(c, True))]):
            for epi, gelu in ((True, True), (True, False), (False, False)):
                if not IM.keeps_config(c, gelu):
                    continue  # the autotuner's pruning never picks it (it would spill)
                if not full and not epi and fp8:
                    continue
                if fp8 and not epi:
                    continue  # the int32 accumulator path is int8 only
                const = dict(EPILOGUE=epi, HAS_BIAS=epi, GELU=gelu, FP8=fp8, UPCAST=False, EVEN_K=True, **c.kwargs)
                code = "*fp8e4nv" if fp8 else "*i8"
                ptrs = {"A": code, "W": code, "AS": "*fp32", "WS": "*fp32", "BIAS": "*bf16",
                        "Y": "*bf16" if epi else "*i32"}
                yield (f"int8_matmul {'fp8' if fp8 else 'int8'} epilogue={epi} gelu={gelu} {c.kwargs} "
                       f"w{c.num_warps} s{c.num_stages}",
                       lambda const=const, ptrs=ptrs, c=c: _compile(
                           IM._int8_matmul_kernel, ptrs, [], const,
                           {"num_warps": c.num_warps, "num_stages": c.num_stages},
                           ("K", "stride_am", "stride_wn", "stride_ym")))


def main(argv=None) -> int:
    """Print one line per configuration (shared memory, registers, spill bytes); fail on a compile error, on shared
    memory over the limit, and on any spill (the autotuners must never pick a spilling configuration)."""
    argv = sys.argv[1:] if argv is None else argv
    failures = 0
    if "--w8a8" in argv:  # only the W8A8 kernels
        source = w8a8_cases(full="--all" in argv)
    else:
        source = cases(full="--all" in argv, pickable="--pickable" in argv)
    for name, thunk in source:
        t0 = time.time()
        try:
            r = thunk()
        except Exception as e:  # noqa: BLE001 - report every failure
            failures += 1
            print(f"FAIL  {name}: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            continue
        smem_ok = r["shared"] <= SMEM_LIMIT
        spill_ok = r["spill_stores"] == 0 and r["spill_loads"] == 0
        failures += (not smem_ok) + (not spill_ok)
        tag = "ok   " if smem_ok and spill_ok else "SMEM!" if not smem_ok else "SPILL"
        print(f"{tag} {name}: {r['shared']} B shared, {r['regs']} regs, spills {r['spill_stores']} B stores / "
              f"{r['spill_loads']} B loads ({time.time() - t0:.1f} s)", flush=True)
    print("all kernels compile for sm_90 (no spills)" if not failures else f"{failures} FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
        sys.exit(2)
    sys.exit(main())
