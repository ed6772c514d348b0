"""One backend switch for every op: ``eager`` | ``triton`` | ``cuda`` | ``auto``.

Every op in :mod:`internvl_kernels.ops` is a ``torch.library`` custom op whose implementation asks
:func:`resolve` which implementation to run for the tensors it got:

* ``eager``  — always the PyTorch reference (:mod:`internvl_kernels.model.functional`).
* ``triton`` — Triton kernels on CUDA tensors; on CPU tensors too when ``TRITON_INTERPRET=1`` was set before
  import (that is how the CPU test suite runs the real kernels); otherwise CPU tensors use the reference.
* ``cuda``   — the compiled extension (``internvl_kernels._C``) where it has a kernel for the op, else Triton.
* ``auto``   — (default) the best available: CUDA extension → Triton on CUDA tensors, reference on CPU.

Select it with :func:`set_backend` (also a context manager) or the environment variable
``INTERNVL_KERNELS_BACKEND``.
"""
from __future__ import annotations

import contextvars
import logging
import os
from typing import Callable

logger = logging.getLogger("internvl_kernels")

BACKENDS = ("auto", "eager", "triton", "cuda")
_ENV = "INTERNVL_KERNELS_BACKEND"


def _initial_backend() -> str:
    name = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not a backend; choose one of {BACKENDS}")
    return name


_current: contextvars.ContextVar[str] = contextvars.ContextVar("internvl_kernels_backend", default=_initial_backend())

# op name -> backend name -> implementation
_IMPLS: dict[str, dict[str, Callable]] = {}


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - platform without triton
        return False
    return True


HAS_TRITON = _has_triton()


class _BackendContext:
    """Returned by :func:`set_backend`; restores the previous backend when used as a context manager."""

    def __init__(self, name: str):
        self.name = name
        self._token = _current.set(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _current.reset(self._token)
        return False

    def __repr__(self):
        return f"backend({self.name!r})"


def set_backend(name: str) -> _BackendContext:
    """Select the kernel backend. ``with set_backend("eager"): ...`` restores the previous one on exit."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    name = name.lower()
    if name == "triton" and not HAS_TRITON:
        raise RuntimeError("backend 'triton' requested but triton is not installed")
    return _BackendContext(name)


backend = set_backend  # ``with internvl_kernels.backend("triton"): ...``


def get_backend() -> str:
    return _current.get()


def register_impl(op: str, backend_name: str, fn: Callable | None = None):
    """Register ``fn`` as the ``backend_name`` implementation of ``op`` (usable as a decorator)."""
    if backend_name not in ("eager", "triton", "cuda"):
        raise ValueError(f"cannot register a {backend_name!r} implementation")

    def deco(f):
        _IMPLS.setdefault(op, {})[backend_name] = f
        return f

    return deco(fn) if fn is not None else deco


def get_impl(op: str, backend_name: str) -> Callable | None:
    """The registered ``backend_name`` implementation of ``op`` (None if there is none)."""
    return _IMPLS.get(op, {}).get(backend_name)


def available_impls(op: str) -> tuple[str, ...]:
    return tuple(_IMPLS.get(op, {}))


def resolve(op: str, device) -> str:
    """Which implementation of ``op`` runs for tensors on ``device`` under the current backend."""
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    name = _current.get()
    dev_type = getattr(device, "type", str(device))
    if name == "eager":
        return "eager"
    if dev_type == "cuda":
        if name in ("cuda", "auto") and "cuda" in impls:
            return "cuda"
        if "triton" in impls and HAS_TRITON:
            return "triton"
        return "eager"
    # CPU (or any other device): real kernels only through the Triton interpreter, and only when asked for.
    if name in ("triton", "cuda") and "triton" in impls and HAS_TRITON and triton_interpret():
        return "triton"
    return "eager"


def dispatch(op: str, device) -> Callable:
    which = resolve(op, device)
    return _IMPLS[op][which]
