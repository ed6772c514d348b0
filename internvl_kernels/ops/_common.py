"""Shared plumbing for the op files: input validation, output allocation, Triton config helpers.

Every op file follows the same pattern (one op, one file):

* a Triton kernel + a ``<op>_triton`` wrapper with the custom op's signature,
* ``register_impl(<op>, "eager", ...)`` (the reference from :mod:`internvl_kernels.model.functional`) and
  ``register_impl(<op>, "triton", <op>_triton)``,
* a ``torch.library.custom_op("internvl_kernels::<op>")`` whose implementation validates the inputs and calls
  ``_backend.dispatch(<op>, device)``, plus a ``register_fake`` for ``torch.compile`` / meta tensors.

A CUDA implementation is ``register_impl("<op>", "cuda", fn, can_implement=...)`` with the same signature, where
``can_implement(*args) -> (ok, reason)`` declares the calls it covers (see :mod:`internvl_kernels.ops._cuda`).

Outputs of the Triton wrappers are allocated with :func:`new_empty`; under :func:`poison_outputs` they are pre-filled
with NaN so the tests prove that every element is written by the kernel.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os

import torch

from .. import _backend

# Decided once, at import: the interpreter must be switched on before triton is imported.
INTERPRET: bool = _backend.triton_interpret()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# -------------------------------------------------------------------------------------------------------------------
# poisoned outputs + launch counting (test hooks, also handy when debugging a kernel)
# -------------------------------------------------------------------------------------------------------------------
_POISON: list = [None]
LAUNCHES: collections.Counter = collections.Counter()


@contextlib.contextmanager
def poison_outputs(value: float = float("nan")):
    """Pre-fill every output buffer a Triton wrapper allocates with ``value`` (NaN by default)."""
    old = _POISON[0]
    _POISON[0] = value
    try:
        yield
    finally:
        _POISON[0] = old


def new_empty(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON[0] is not None:
        out.fill_(_POISON[0])
    return out


def count_launch(name: str) -> None:
    LAUNCHES[name] += 1


def launches(name: str | None = None) -> int:
    return sum(LAUNCHES.values()) if name is None else LAUNCHES[name]


# -------------------------------------------------------------------------------------------------------------------
# validation (metadata only, so the same checks run on fake tensors under torch.compile)
# -------------------------------------------------------------------------------------------------------------------
def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; supported dtypes are float32, float16, bfloat16")


def check_same_device(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


def check_rank(op: str, name: str, t: torch.Tensor, ranks) -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.dim() not in ranks:
        want = " or ".join(str(r) for r in ranks)
        raise ValueError(f"{op}: {name} must have rank {want}, got shape {tuple(t.shape)}")


def check_vector(op: str, name: str, t: torch.Tensor | None, n: int) -> None:
    """A per-channel parameter (norm weight / bias / layer scale) of length ``n``."""
    if t is None:
        return
    check_float(op, name, t)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{op}: {name} must have shape ({n},) to match the last dim of the input, got {tuple(t.shape)}")


def check_same_dtype(op: str, ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, channels]`` with a unit stride along channels (a view when possible, else a copy)."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# -------------------------------------------------------------------------------------------------------------------
# Triton helpers
# -------------------------------------------------------------------------------------------------------------------
def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def autotune_configs(gpu_configs, interpret_config):
    """Under ``TRITON_INTERPRET`` autotuning with more than one config fails (it benchmarks): use a single config."""
    return [interpret_config] if INTERPRET else list(gpu_configs)


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter computes bf16 ``tl.dot`` wrongly: upcast the operands to fp32 there (exact products)."""
    return INTERPRET and dtype == torch.bfloat16


def env_flag(name: str, default: str) -> str:
    return os.environ.get(name, default).strip().lower() or default


# -------------------------------------------------------------------------------------------------------------------
# device guard: Triton launches on the *current* CUDA device; every wrapper enters the inputs' device first
# -------------------------------------------------------------------------------------------------------------------
def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (so a model split over GPUs launches each kernel on its
    tensors' GPU), a no-op context otherwise."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator for the Triton wrappers: run ``fn`` inside :func:`device_guard` of its first tensor argument."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        ref = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if ref is None:
            return fn(*args, **kwargs)
        with device_guard(ref):  # looked up at call time (tests count the entries)
            return fn(*args, **kwargs)

    return run


# -------------------------------------------------------------------------------------------------------------------
# autotuning and CUDA graphs: no benchmarking inside a capture
# -------------------------------------------------------------------------------------------------------------------
_log = logging.getLogger("internvl_kernels")
TUNERS: dict = {}  # name -> triton Autotuner, for tune-ahead and reports
_WARNED: set = set()


def register_tuner(name: str, tuner):
    TUNERS[name] = tuner
    return tuner


def capturing() -> bool:
    """True while the current CUDA stream is being captured into a CUDA graph."""
    return (not INTERPRET) and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tuning_key(tuner, args: tuple, kwargs: dict) -> tuple:
    """The key triton's ``Autotuner.run`` caches the best config under (its ``key`` arguments + tensor dtypes)."""
    all_args = {**dict(zip(tuner.arg_names, args)), **kwargs}
    named = {k: v for k, v in all_args.items() if k in tuner.arg_names}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    return tuple(key)


def launch_tuned(name: str, tuner, grid, *args, prune=None, **kwargs):
    """``tuner[grid](*args, **kwargs)``, except inside a CUDA-graph capture when this key was never tuned: then the
    first configuration the pruning keeps is launched directly (benchmarking can't run inside a capture) and one
    warning says so. Tune ahead with :func:`internvl_kernels.ops.warmup` (or one eager call) before capturing."""
    if len(tuner.configs) > 1 and capturing() and tuning_key(tuner, args, kwargs) not in tuner.cache:
        configs = tuner.configs
        if prune is not None:
            configs = prune(configs, dict(zip(tuner.arg_names, args)), **kwargs) or configs
        cfg = configs[0]
        if name not in _WARNED:
            _WARNED.add(name)
            _log.warning("%s: untuned shape inside a CUDA-graph capture; launching the fixed config %s "
                         "(call internvl_kernels.ops.warmup(...) before capturing to tune ahead)", name, cfg)
        return tuner.fn[grid](*args, **kwargs, **cfg.all_kwargs())
    return tuner[grid](*args, **kwargs)


def tuned_keys() -> int:
    """How many (kernel, key) pairs the autotuners have tuned in this process."""
    return sum(len(getattr(t, "cache", {})) for t in TUNERS.values())


def warmup(fn, *args, **kwargs):
    """Tune ahead: run ``fn(*args, **kwargs)`` once outside any CUDA-graph capture (every autotuned kernel it
    launches benchmarks its configs now), synchronize, and return ``(result, newly_tuned_keys)``. Call it with the
    shapes you will capture (e.g. one forward of the model) before ``torch.cuda.graph(...)``."""
    if capturing():
        raise RuntimeError("internvl_kernels.ops.warmup: called inside a CUDA-graph capture; call it before capturing")
    before = tuned_keys()
    with torch.no_grad():
        out = fn(*args, **kwargs)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, tuned_keys() - before
