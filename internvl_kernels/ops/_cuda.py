"""The ``cuda`` backend: hand-written CUDA kernels from the compiled extension ``internvl_kernels._C`` (csrc/).

Importing this module (``internvl_kernels.ops`` does it) tries to load the extension once. When it is missing (a
CPU-only install, ``pip install .`` without ``--no-build-isolation``, ``INTERNVL_KERNELS_NO_CUDA=1``) or was built
against another torch / CUDA major version, it logs **one** line and registers nothing: ``set_backend("cuda")``
then runs Triton for every op (:func:`internvl_kernels._backend.resolve` falls back per op).

When it loads, each op below is registered with ``register_impl(op, "cuda", fn)``. The wrappers take exactly the
arguments of the op's Triton/eager implementations and route the cases the CUDA kernels do not cover to the
op's Triton implementation (eager where Triton is absent):

==========================  ===================================================  ===============================
op                          CUDA kernel                                          routed to Triton
==========================  ===================================================  ===============================
rms_norm, add_rms_norm      csrc/rms_norm.cu (Llama casting, fused residual)     mixed dtypes (weight != x)
layer_norm, add_layer_norm  csrc/layer_norm.cu                                   mixed dtypes
pixel_shuffle               csrc/pixel_shuffle.cu                                -
pixel_shuffle_layer_norm    csrc/pixel_shuffle.cu (gather straight into the LN)  mixed dtypes
mlp_projector               our LN -> cuBLAS -> bias+erf-GELU -> cuBLAS addmm    -
attention                   csrc/attention.cu (mma.sync flash attention)         fp32, head_dim not 64/128
qk_norm_attention           rstd pre-pass + attention.cu applying the norm       fp32, head_dim not 64/128,
                            while loading q/k tiles                              mixed dtypes
quant_matmul                csrc/quant_matmul.cu (GPTQ v1/v2, 4/8-bit, M<=16;   awq, 2/3-bit, fp32 x, M>16,
                            exact-integer path when g_idx is None and            K%16 or N%32 != 0
                            group_size % 64 == 0)
==========================  ===================================================  ===============================

Every op also goes to Triton on GPUs older than sm_80 (the extension is built for sm_80+ only).
"""
from __future__ import annotations

import logging
import os

import torch

from .. import _backend
from . import _common

logger = logging.getLogger("internvl_kernels")

OPS = (
    "rms_norm", "layer_norm", "add_rms_norm", "add_layer_norm", "pixel_shuffle", "pixel_shuffle_layer_norm",
    "mlp_projector", "attention", "qk_norm_attention", "quant_matmul",
)
# quant_matmul: the CUDA kernel is the decode kernel for one 16-row m-tile (a CTA reads its weight slice once per
# 16 rows, so M > 16 would re-read the weights); larger M goes to Triton (split-K up to 32 rows, then tiled GEMM).
QUANT_MATMUL_MAX_M = 16
_HALF = (torch.float16, torch.bfloat16)

_ext = None  # the loaded extension module
_error: str | None = None  # why it is not used (None when it is)
_registered: tuple[str, ...] = ()


def _parse_build_info(info: str) -> dict:
    out = {}
    for item in info.split(";"):
        if "=" in item:
            k, v = item.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def _major_minor(v: str) -> tuple[str, ...]:
    return tuple(v.split("+")[0].split(".")[:2])


def _load():
    """Returns ``(module, None)`` or ``(None, reason)``."""
    if os.environ.get("INTERNVL_KERNELS_NO_CUDA", "0").strip() not in ("", "0"):
        return None, "INTERNVL_KERNELS_NO_CUDA is set"
    try:
        from .. import _C as ext
    except ImportError as e:
        msg = str(e)
        if "internvl_kernels._C" in msg or "No module named" in msg or "cannot import name '_C'" in msg:
            return None, ("the extension internvl_kernels._C is not built (build it on a CUDA machine with "
                          "`pip install --no-build-isolation -e .`)")
        return None, f"internvl_kernels._C failed to load ({msg.splitlines()[0] if msg else type(e).__name__}); " \
                     "rebuild it against the installed torch"
    except OSError as e:  # broken shared library
        return None, f"internvl_kernels._C failed to load ({e}); rebuild it against the installed torch"
    info = _parse_build_info(ext.build_info())
    built_torch, built_cuda = info.get("torch", "?"), info.get("cuda", "?")
    if _major_minor(built_torch) != _major_minor(torch.__version__):
        return None, (f"internvl_kernels._C was built against torch {built_torch} but torch {torch.__version__} is "
                      "running; rebuild it (`pip install --no-build-isolation -e .`)")
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} has no CUDA"
    if built_cuda.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (f"internvl_kernels._C was built with CUDA {built_cuda} but torch uses CUDA "
                      f"{torch.version.cuda}; rebuild it")
    ns = getattr(torch.ops, "internvl_kernels_cuda", None)
    missing = [op for op in OPS if ns is None or not hasattr(ns, op)]
    if missing:
        return None, f"internvl_kernels._C lacks the ops {missing}; rebuild it"
    return ext, None


def available() -> bool:
    """True when the CUDA kernels are loaded and registered."""
    return _ext is not None


def status() -> str:
    """One line: what the ``cuda`` backend runs."""
    if _ext is None:
        return f"cuda backend: extension not used ({_error}); ops run on Triton"
    return f"cuda backend: internvl_kernels._C ({_ext.build_info()}) for {', '.join(_registered)}"


# ------------------------------------------------------------------------------------------------- plumbing
def _fallback(op: str):
    """The op's Triton implementation (eager if Triton is absent)."""
    triton_impl = _backend.get_impl(op, "triton")
    if triton_impl is not None and _backend.HAS_TRITON:
        return triton_impl
    eager_impl = _backend.get_impl(op, "eager")
    if eager_impl is not None:
        return eager_impl
    from ..model import functional as F_ref  # op registered no fallback (should not happen)

    return getattr(F_ref, op)


_last_poison = [None]


def _sync_poison() -> None:
    """Mirror ``ops.poison_outputs`` into the extension (its outputs are allocated in C++)."""
    p = _common._POISON[0]  # noqa: SLF001
    if p is None and _last_poison[0] is None:
        return
    _ext.set_poison(None if p is None else float(p))
    _last_poison[0] = p


def _call(op: str, *args):
    _sync_poison()
    _common.count_launch("cuda:" + op)
    return getattr(torch.ops.internvl_kernels_cuda, op)(*args)


def _same_dtype(ref: torch.Tensor, *ts) -> bool:
    return all(t is None or t.dtype == ref.dtype for t in ts)


_SM_OK: dict = {}


def _sm80(t: torch.Tensor) -> bool:
    """The extension is built for sm_80+ only (cp.async, bf16 mma): older GPUs run the op on Triton."""
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _SM_OK.get(idx)
    if ok is None:
        ok = _SM_OK[idx] = torch.cuda.get_device_capability(idx) >= (8, 0)
    return ok


# ----------------------------------------------------------------------------------------------- wrappers
def rms_norm(x, weight, eps=1e-6):
    if not _sm80(x) or not _same_dtype(x, weight):
        return _fallback("rms_norm")(x, weight, eps)
    return _call("rms_norm", x, weight, float(eps))


def layer_norm(x, weight, bias, eps=1e-6):
    if not _sm80(x) or not _same_dtype(x, weight, bias):
        return _fallback("layer_norm")(x, weight, bias, eps)
    return _call("layer_norm", x, weight, bias, float(eps))


def add_rms_norm(x, residual, weight, eps=1e-6, scale=None):
    if not _sm80(x) or not _same_dtype(x, residual, weight, scale):
        return _fallback("add_rms_norm")(x, residual, weight, eps, scale)
    return _call("add_rms_norm", x, residual, weight, float(eps), scale)  # (new_residual, normed)


def add_layer_norm(x, residual, weight, bias, eps=1e-6, scale=None):
    if not _sm80(x) or not _same_dtype(x, residual, weight, bias, scale):
        return _fallback("add_layer_norm")(x, residual, weight, bias, eps, scale)
    return _call("add_layer_norm", x, residual, weight, bias, float(eps), scale)  # (new_residual, normed)


def _ratio(scale_factor: float) -> int:
    return round(1 / scale_factor)  # validated by the custom op (integer 1/scale_factor)


def pixel_shuffle(x, scale_factor=0.5, version="v2"):
    if not _sm80(x):
        return _fallback("pixel_shuffle")(x, scale_factor, version)
    return _call("pixel_shuffle", x, _ratio(scale_factor), version == "v2")


def pixel_shuffle_layer_norm(x, weight, bias, scale_factor=0.5, version="v2", eps=1e-5):
    if not _sm80(x) or not _same_dtype(x, weight, bias):
        return _fallback("pixel_shuffle_layer_norm")(x, weight, bias, scale_factor, version, eps)
    return _call("pixel_shuffle_layer_norm", x, weight, bias, _ratio(scale_factor), version == "v2", float(eps))


def mlp_projector(x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5):
    if not _sm80(x):
        return _fallback("mlp_projector")(x, ln_weight, ln_bias, w1, b1, w2, b2, eps)
    return _call("mlp_projector", x, ln_weight, ln_bias, w1, b1, w2, b2, float(eps))


def attention(q, k, v, scale=None):
    if q.dtype not in _HALF or q.shape[-1] not in (64, 128) or not _same_dtype(q, k, v) or not _sm80(q):
        return _fallback("attention")(q, k, v, scale)
    return _call("attention", q, k, v, None if scale is None else float(scale))


def qk_norm_attention(qkv, q_norm_weight, k_norm_weight, num_heads, eps=1e-6, scale=None):
    C = qkv.shape[-1] // 3
    D = C // num_heads if num_heads > 0 else 0
    if (qkv.dtype not in _HALF or D not in (64, 128) or C % 8 != 0
            or not _same_dtype(qkv, q_norm_weight, k_norm_weight) or not _sm80(qkv)):
        return _fallback("qk_norm_attention")(qkv, q_norm_weight, k_norm_weight, num_heads, eps, scale)
    return _call("qk_norm_attention", qkv, q_norm_weight, k_norm_weight, int(num_heads), float(eps),
                 None if scale is None else float(scale))


_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}


def quant_matmul(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    from .quant_matmul import check_g_idx_range

    check_g_idx_range(g_idx, scales.shape[0])  # the kernel indexes scales / zeros with g_idx unmasked
    K = x.shape[-1]
    N = qweight.shape[-1]
    M = x.numel() // K if K else 0
    if (layout not in _ZERO_OFFSET or bits not in (4, 8) or x.dtype not in _HALF or K % 16 or N % 32
            or M > QUANT_MATMUL_MAX_M or (g_idx is not None and g_idx.dtype not in (torch.int32, torch.int64))
            or not _sm80(x)):
        return _fallback("quant_matmul")(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout)
    if g_idx is not None and g_idx.dtype != torch.int32:
        g_idx = g_idx.to(torch.int32)
    return _call("quant_matmul", x, qweight, scales, qzeros, g_idx, bias, int(bits), int(group_size),
                 _ZERO_OFFSET[layout])


_WRAPPERS = {
    "rms_norm": rms_norm, "layer_norm": layer_norm, "add_rms_norm": add_rms_norm, "add_layer_norm": add_layer_norm,
    "pixel_shuffle": pixel_shuffle, "pixel_shuffle_layer_norm": pixel_shuffle_layer_norm,
    "mlp_projector": mlp_projector, "attention": attention, "qk_norm_attention": qk_norm_attention,
    "quant_matmul": quant_matmul,
}


def _init() -> None:
    global _ext, _error, _registered
    _ext, _error = _load()
    if _ext is None:
        # One line. Expected (INFO) without a CUDA torch or when opted out; a WARNING where CUDA kernels could run.
        quiet = torch.version.cuda is None or _error == "INTERNVL_KERNELS_NO_CUDA is set"
        logger.log(logging.INFO if quiet else logging.WARNING,
                   "internvl_kernels: CUDA backend unavailable: %s; set_backend('cuda') runs the Triton kernels.",
                   _error)
        return
    for op, fn in _WRAPPERS.items():
        _backend.register_impl(op, "cuda", fn)
    _registered = tuple(_WRAPPERS)


_init()
