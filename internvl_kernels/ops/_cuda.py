"""The ``cuda`` backend: hand-written CUDA kernels from the compiled extension ``internvl_kernels._C`` (csrc/).

Importing this module (``internvl_kernels.ops`` does it) tries to load the extension once. When it is missing (a
CPU-only install, ``pip install .`` without ``--no-build-isolation``, ``INTERNVL_KERNELS_NO_CUDA=1``) or was built
against another torch / CUDA major version, it logs **one** line and registers nothing: ``set_backend("cuda")``
then runs Triton for every op (:func:`internvl_kernels._backend.resolve` falls back per op).

When it loads, each op below is registered with ``register_impl(op, "cuda", impl, can_implement=...)``. Each
:class:`CudaImpl` takes exactly the arguments of the op's Triton/eager implementations and declares what its kernel
covers with ``can_implement(*args) -> (ok, reason)``; a call it cannot run goes to the next implementation in
priority order (Triton, else eager), and the reason is kept (:func:`internvl_kernels._backend.rejections`, a debug
log line at first occurrence, ``python -m internvl_kernels``). What the kernels do not cover:

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
from ..quant import formats
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
HEAD_DIMS = (64, 128)

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
    """The next implementation of ``op`` in priority order after CUDA: Triton, else eager."""
    impl = _backend.next_impl(op, "cuda")
    if impl is not None:
        return impl
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


_SM_OK: dict = {}


def _sm80(t: torch.Tensor) -> bool:
    """The extension is built for sm_80+ only (cp.async, bf16 mma): older GPUs run the op on Triton."""
    idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
    ok = _SM_OK.get(idx)
    if ok is None:
        ok = _SM_OK[idx] = torch.cuda.get_device_capability(idx) >= (8, 0)
    return ok


OK = (True, "ok")


def _same_dtype(ref: torch.Tensor, names: str, *ts):
    """``(True, "ok")`` or ``(False, reason)`` when a tensor of ``ts`` (named in ``names``) differs in dtype."""
    for name, t in zip(names.split(), ts):
        if t is not None and t.dtype != ref.dtype:
            return False, f"mixed dtypes ({name} is {t.dtype}, the input {ref.dtype}; the CUDA kernel needs one dtype)"
    return OK


def _gpu(t: torch.Tensor):
    if not _sm80(t):
        return False, "GPU older than sm_80 (the extension is built for sm_80+)"
    return OK


def _first_fail(*checks):
    for c in checks:
        ok, why = c() if callable(c) else c
        if not ok:
            return False, why
    return OK


class CudaImpl:
    """The CUDA implementation of one op: ``can_implement(*args) -> (ok, reason)`` and the launch."""

    def __init__(self, op: str, can_implement, launch):
        self.op, self._can, self._launch = op, can_implement, launch
        self.__name__ = f"cuda_{op}"

    def can_implement(self, *args, **kwargs) -> tuple[bool, str]:
        return self._can(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        ok, why = self._can(*args, **kwargs)
        if not ok:
            _backend.note_rejection(self.op, "cuda", why)
            return _fallback(self.op)(*args, **kwargs)
        return self._launch(*args, **kwargs)

    def __repr__(self):
        return f"CudaImpl({self.op!r})"


# ----------------------------------------------------------------------------------------------- the ops
def _ratio(scale_factor: float) -> int:
    return round(1 / scale_factor)  # validated by the custom op (integer 1/scale_factor)


def _can_dtype_half(t: torch.Tensor):
    if t.dtype not in _HALF:
        return False, f"{t.dtype} input (the CUDA kernel is fp16/bf16 only)"
    return OK


def _can_head_dim(D: int):
    if D not in HEAD_DIMS:
        return False, f"head_dim {D} (the CUDA kernel has {HEAD_DIMS})"
    return OK


rms_norm = CudaImpl(
    "rms_norm",
    lambda x, weight, eps=1e-6: _first_fail(lambda: _gpu(x), _same_dtype(x, "weight", weight)),
    lambda x, weight, eps=1e-6: _call("rms_norm", x, weight, float(eps)))

layer_norm = CudaImpl(
    "layer_norm",
    lambda x, weight, bias, eps=1e-6: _first_fail(lambda: _gpu(x), _same_dtype(x, "weight bias", weight, bias)),
    lambda x, weight, bias, eps=1e-6: _call("layer_norm", x, weight, bias, float(eps)))

add_rms_norm = CudaImpl(  # returns (new_residual, normed)
    "add_rms_norm",
    lambda x, residual, weight, eps=1e-6, scale=None: _first_fail(
        lambda: _gpu(x), _same_dtype(x, "residual weight scale", residual, weight, scale)),
    lambda x, residual, weight, eps=1e-6, scale=None: _call("add_rms_norm", x, residual, weight, float(eps), scale))

add_layer_norm = CudaImpl(  # returns (new_residual, normed)
    "add_layer_norm",
    lambda x, residual, weight, bias, eps=1e-6, scale=None: _first_fail(
        lambda: _gpu(x), _same_dtype(x, "residual weight bias scale", residual, weight, bias, scale)),
    lambda x, residual, weight, bias, eps=1e-6, scale=None: _call("add_layer_norm", x, residual, weight, bias,
                                                                  float(eps), scale))

pixel_shuffle = CudaImpl(
    "pixel_shuffle",
    lambda x, scale_factor=0.5, version="v2": _gpu(x),
    lambda x, scale_factor=0.5, version="v2": _call("pixel_shuffle", x, _ratio(scale_factor), version == "v2"))

pixel_shuffle_layer_norm = CudaImpl(
    "pixel_shuffle_layer_norm",
    lambda x, weight, bias, scale_factor=0.5, version="v2", eps=1e-5: _first_fail(
        lambda: _gpu(x), _same_dtype(x, "weight bias", weight, bias)),
    lambda x, weight, bias, scale_factor=0.5, version="v2", eps=1e-5: _call(
        "pixel_shuffle_layer_norm", x, weight, bias, _ratio(scale_factor), version == "v2", float(eps)))

mlp_projector = CudaImpl(
    "mlp_projector",
    lambda x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5: _gpu(x),
    lambda x, ln_weight, ln_bias, w1, b1, w2, b2, eps=1e-5: _call("mlp_projector", x, ln_weight, ln_bias, w1, b1,
                                                                  w2, b2, float(eps)))

attention = CudaImpl(
    "attention",
    lambda q, k, v, scale=None: _first_fail(_can_dtype_half(q), _can_head_dim(q.shape[-1]),
                                            _same_dtype(q, "k v", k, v), lambda: _gpu(q)),
    lambda q, k, v, scale=None: _call("attention", q, k, v, None if scale is None else float(scale)))


def _can_qk_norm_attention(qkv, q_norm_weight, k_norm_weight, num_heads, eps=1e-6, scale=None, qk_norm=None):
    C = qkv.shape[-1] // 3
    D = C // num_heads if num_heads > 0 else 0
    return _first_fail(_can_dtype_half(qkv), _can_head_dim(D),
                       (C % 8 == 0, f"C={C} channels not a multiple of 8 (16-byte rows)"),
                       _same_dtype(qkv, "q_norm_weight k_norm_weight", q_norm_weight, k_norm_weight),
                       lambda: _gpu(qkv))


# the CUDA kernel always applies the reference's two roundings (what qk_norm="exact" asks of Triton)
qk_norm_attention = CudaImpl(
    "qk_norm_attention", _can_qk_norm_attention,
    lambda qkv, q_norm_weight, k_norm_weight, num_heads, eps=1e-6, scale=None, qk_norm=None: _call(
        "qk_norm_attention", qkv, q_norm_weight, k_norm_weight, int(num_heads), float(eps),
        None if scale is None else float(scale)))


def _can_quant_matmul(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    K = x.shape[-1]
    N = qweight.shape[-1]
    M = x.numel() // K if K else 0
    fmt = formats.get_format(layout)
    return _first_fail(
        (fmt.has_g_idx, f"layout {layout!r} (the CUDA kernel reads the GPTQ layouts)"),
        (bits in (4, 8), f"{bits}-bit (the CUDA kernel has 4 and 8 bits)"),
        _can_dtype_half(x),
        (K % 16 == 0, f"in_features={K} not a multiple of 16"),
        (N % 32 == 0, f"out_features={N} not a multiple of 32"),
        (M <= QUANT_MATMUL_MAX_M, f"M={M} rows > {QUANT_MATMUL_MAX_M} (the CUDA kernel is the decode kernel of "
                                  "one 16-row m-tile; larger M runs the Triton GEMM)"),
        (g_idx is None or g_idx.dtype in (torch.int32, torch.int64), "g_idx is neither int32 nor int64"),
        lambda: _gpu(x))


def _launch_quant_matmul(x, qweight, scales, qzeros, g_idx, bias, bits, group_size, layout):
    from .quant_matmul import check_g_idx_range

    check_g_idx_range(g_idx, scales.shape[0])  # the kernel indexes scales / zeros with g_idx unmasked
    if g_idx is not None and g_idx.dtype != torch.int32:
        g_idx = g_idx.to(torch.int32)
    return _call("quant_matmul", x, qweight, scales, qzeros, g_idx, bias, int(bits), int(group_size),
                 formats.get_format(layout).zero_offset)


quant_matmul = CudaImpl("quant_matmul", _can_quant_matmul, _launch_quant_matmul)

_WRAPPERS = {impl.op: impl for impl in (rms_norm, layer_norm, add_rms_norm, add_layer_norm, pixel_shuffle,
                                        pixel_shuffle_layer_norm, mlp_projector, attention, qk_norm_attention,
                                        quant_matmul)}


def build_info() -> dict:
    """What the loaded extension says about its build (``{}`` when it is not loaded)."""
    return _parse_build_info(_ext.build_info()) if _ext is not None else {}


def unavailable_reason() -> str | None:
    """Why the extension is not used (``None`` when it is)."""
    return None if _ext is not None else _error


def registered() -> tuple[str, ...]:
    """The ops the extension registered as their ``cuda`` implementation."""
    return _registered


def _init() -> None:
    global _ext, _error, _registered
    _ext, _error = _load()
    if _ext is None:
        _backend.set_unavailable("cuda", f"extension not used: {_error}")
        # One line. Expected (INFO) without a CUDA torch or when opted out; a WARNING where CUDA kernels could run.
        quiet = torch.version.cuda is None or _error == "INTERNVL_KERNELS_NO_CUDA is set"
        logger.log(logging.INFO if quiet else logging.WARNING,
                   "internvl_kernels: CUDA backend unavailable: %s; set_backend('cuda') runs the Triton kernels.",
                   _error)
        return
    _backend.set_unavailable("cuda", None)
    for op, impl in _WRAPPERS.items():
        _backend.register_impl(op, "cuda", impl, can_implement=impl.can_implement)
    _registered = tuple(_WRAPPERS)


_init()
