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
