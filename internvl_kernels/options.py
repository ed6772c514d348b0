"""Process-wide kernel options that change numerics or which kernel runs.

=====================  ==========================  ==============================================================
option                 setter                      values (default) — environment override read once at import
=====================  ==========================  ==============================================================
QK-norm application    :func:`set_qk_norm`         ``"fold"`` (default) | ``"exact"`` — ``INTERNVL_KERNELS_QK_NORM``
linear selector        :func:`set_linear_impl`     ``"auto"`` (default) | ``"triton"`` | ``"cublas"`` —
                                                   ``INTERNVL_KERNELS_LINEAR``
=====================  ==========================  ==============================================================

* ``qk_norm`` (Triton ``qk_norm_attention``): ``fold`` folds the k-norm weight into q and k's per-token rstd into
  the score scale (no per-tile k work; one extra rounding of q ⊙ w_k), ``exact`` normalizes every k tile with the
  reference's two roundings. The op and :func:`internvl_kernels.patch_model` also take ``qk_norm=`` per call.
* ``linear`` (Triton ``linear`` on a GPU): ``auto`` times cuBLAS against the fused-epilogue Triton kernel once per
  (M bucket, N, K, dtype, activation) and keeps the faster (:func:`internvl_kernels.ops.linear_choices`);
  ``triton`` / ``cublas`` force one.

Each setter returns a handle that restores the previous value when used as a context manager
(``with set_qk_norm("exact"): ...``). An invalid environment value raises at import, naming the variable.
The backend switch itself is :func:`internvl_kernels.set_backend` (``INTERNVL_KERNELS_BACKEND``).
"""
from __future__ import annotations

import os

__all__ = ["QK_NORM_MODES", "LINEAR_IMPLS", "set_qk_norm", "get_qk_norm", "set_linear_impl", "get_linear_impl",
           "check_qk_norm", "env_default"]

QK_NORM_MODES = ("fold", "exact")
LINEAR_IMPLS = ("auto", "triton", "cublas")


def env_default(var: str, default: str, choices: tuple) -> str:
    """``$var`` (stripped, lower-case) if set and non-empty, else ``default``; a value not in ``choices`` raises."""
    value = os.environ.get(var, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{var}={value!r} is not valid; choose one of {choices}")
    return value


_values = {
    "qk_norm": env_default("INTERNVL_KERNELS_QK_NORM", "fold", QK_NORM_MODES),
    "linear": env_default("INTERNVL_KERNELS_LINEAR", "auto", LINEAR_IMPLS),
}


class _Restore:
    def __init__(self, key: str, previous: str):
        self.key, self.previous = key, previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _values[self.key] = self.previous
        return False

    def __repr__(self):
        return f"{self.key}={_values[self.key]!r}"


def _set(key: str, value, choices: tuple, what: str) -> _Restore:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")
    previous = _values[key]
    _values[key] = value.lower()
    return _Restore(key, previous)


def check_qk_norm(mode) -> str:
    """``mode`` validated (``None`` → the current default)."""
    if mode is None:
        return _values["qk_norm"]
    if not isinstance(mode, str) or mode.lower() not in QK_NORM_MODES:
        raise ValueError(f"qk_norm must be one of {QK_NORM_MODES}, got {mode!r}")
    return mode.lower()


def set_qk_norm(mode: str) -> _Restore:
    """Default ``qk_norm`` of :func:`internvl_kernels.ops.qk_norm_attention` (``"fold"`` | ``"exact"``)."""
    return _set("qk_norm", mode, QK_NORM_MODES, "qk_norm")


def get_qk_norm() -> str:
    return _values["qk_norm"]


def set_linear_impl(mode: str) -> _Restore:
    """Which GEMM the Triton ``linear`` uses on a GPU: ``"auto"`` (measured once per shape), ``"triton"``,
    ``"cublas"``."""
    return _set("linear", mode, LINEAR_IMPLS, "linear impl")


def get_linear_impl() -> str:
    return _values["linear"]
