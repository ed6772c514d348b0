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

# op name -> backend name -> implementation; and the optional ``can_implement(*args) -> (ok, reason)`` of each
_IMPLS: dict[str, dict[str, Callable]] = {}
_CAN: dict[tuple[str, str], Callable] = {}
# backend name -> why it is unavailable on this machine (set by the backend's loader; absent = no reason known)
_UNAVAILABLE: dict[str, str] = {}
# (op, backend) -> the last reason a call was not run there; logged at debug level the first time each appears
_REJECTED: dict[tuple[str, str], str] = {}
_LOGGED: set = set()
PRIORITY = ("cuda", "triton", "eager")  # best first


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


def register_impl(op: str, backend_name: str, fn: Callable | None = None, *, can_implement: Callable | None = None):
    """Register ``fn`` as the ``backend_name`` implementation of ``op`` (usable as a decorator).

    ``can_implement(*args) -> (ok, reason)`` declares which calls the implementation covers (same arguments as
    ``fn``); an implementation that cannot run a call hands it to the next one in :data:`PRIORITY` order and the
    reason is kept (:func:`rejections`)."""
    if backend_name not in PRIORITY:
        raise ValueError(f"cannot register a {backend_name!r} implementation")

    def deco(f):
        _DISPATCH_CACHE.clear()
        _IMPLS.setdefault(op, {})[backend_name] = f
        if can_implement is not None:
            _CAN[(op, backend_name)] = can_implement
        else:
            _CAN.pop((op, backend_name), None)
        return f

    return deco(fn) if fn is not None else deco


def get_impl(op: str, backend_name: str) -> Callable | None:
    """The registered ``backend_name`` implementation of ``op`` (None if there is none)."""
    return _IMPLS.get(op, {}).get(backend_name)


def available_impls(op: str) -> tuple[str, ...]:
    return tuple(_IMPLS.get(op, {}))


def set_unavailable(backend_name: str, reason: str | None) -> None:
    """Record why ``backend_name`` cannot run on this machine (``None``: it can)."""
    _DISPATCH_CACHE.clear()
    if reason is None:
        _UNAVAILABLE.pop(backend_name, None)
    else:
        _UNAVAILABLE[backend_name] = reason


def next_impl(op: str, after: str) -> Callable | None:
    """The first implementation of ``op`` below ``after`` in :data:`PRIORITY` order that can run here (Triton only
    when it is installed)."""
    impls = _IMPLS.get(op, {})
    for name in PRIORITY[PRIORITY.index(after) + 1:]:
        if name in impls and (name != "triton" or HAS_TRITON):
            return impls[name]
    return None


def note_rejection(op: str, backend_name: str, reason: str) -> None:
    """Keep why a call of ``op`` did not run on ``backend_name``; logs it (debug) the first time it appears."""
    _REJECTED[(op, backend_name)] = reason
    if (op, backend_name, reason) not in _LOGGED:
        _LOGGED.add((op, backend_name, reason))
        logger.debug("internvl_kernels: %s: %s backend not used for this call: %s", op, backend_name, reason)


def rejections() -> dict[tuple[str, str], str]:
    """``{(op, backend): reason}``: the last reason each op was handed past a backend in this process."""
    return dict(_REJECTED)


def candidates(op: str, device, backend_name: str | None = None) -> list[tuple[str, bool, str]]:
    """Every implementation of ``op`` in priority order with ``(backend, usable, reason)`` for tensors on ``device``
    under the backend selection ``backend_name`` (default: the current one). Per-call conditions (dtypes, shapes)
    are the implementations' own ``can_implement``; see :func:`explain`."""
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation registered for op {op!r}")
    sel = backend_name or _current.get()
    dev_type = getattr(device, "type", str(device))
    out = []
    for name in PRIORITY:
        if name not in impls:
            why = _UNAVAILABLE.get(name) or f"no {name} implementation of {op}"
            out.append((name, False, why))
            continue
        if name == "eager":
            out.append((name, True, "the reference (internvl_kernels.model.functional)"))
            continue
        if sel == "eager":
            out.append((name, False, "backend 'eager' selected"))
        elif name == "triton" and not HAS_TRITON:
            out.append((name, False, "triton is not installed"))
        elif dev_type == "cuda":
            if name == "cuda" and sel == "triton":
                out.append((name, False, "backend 'triton' selected"))
            else:
                out.append((name, True, f"{name} kernels on CUDA tensors"))
        elif name == "cuda":
            out.append((name, False, f"{dev_type} tensors (the CUDA extension runs on CUDA tensors)"))
        elif sel == "auto":
            out.append((name, False, f"backend 'auto' runs the reference on {dev_type} tensors"))
        elif not triton_interpret():
            out.append((name, False, f"{dev_type} tensors run Triton only under TRITON_INTERPRET=1"))
        else:
            out.append((name, True, f"Triton interpreter on {dev_type} tensors (TRITON_INTERPRET=1)"))
    return out


def resolve(op: str, device) -> str:
    """Which implementation of ``op`` runs first for tensors on ``device`` under the current backend (an
    implementation with ``can_implement`` may still hand a particular call on; see :func:`explain`)."""
    for name, ok, _ in candidates(op, device):
        if ok:
            return name
    raise KeyError(f"no usable implementation for op {op!r}")  # pragma: no cover - eager is always usable


def explain(op: str, device, *args, **kwargs) -> list[tuple[str, bool, str]]:
    """Like :func:`candidates`, with each usable implementation's ``can_implement`` asked about these arguments:
    the first ``True`` row is the implementation that runs the call."""
    rows = []
    for name, ok, why in candidates(op, device):
        can = _CAN.get((op, name))
        if ok and can is not None and args:
            ok, why = can(*args, **kwargs)
        rows.append((name, ok, why))
    return rows


_DISPATCH_CACHE: dict = {}


def dispatch(op: str, device) -> Callable:
    """The implementation that runs ``op`` for tensors on ``device`` (first usable one in priority order)."""
    dev_type = getattr(device, "type", str(device))
    key = (op, _current.get(), dev_type, triton_interpret())
    table = _IMPLS.get(op)
    hit = _DISPATCH_CACHE.get(key)
    if hit is not None and hit[0] is table:
        return hit[1]
    which = resolve(op, dev_type)
    fn = table[which]
    _DISPATCH_CACHE[key] = (table, fn)
    if (op, which) not in _LOGGED:
        _LOGGED.add((op, which))
        rejected = [f"{n}: {w}" for n, ok, w in candidates(op, device) if not ok and n != which]
        logger.debug("internvl_kernels: %s on %s tensors runs %s%s", op, getattr(device, "type", device), which,
                     f" ({'; '.join(rejected)})" if rejected else "")
    return fn
