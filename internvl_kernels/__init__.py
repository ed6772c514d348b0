"""internvl-kernels: optimized kernels and quantizers for InternVL-Chat (V1.1, V1.2, V1.5)."""
from __future__ import annotations

__version__ = "0.1.0"

from ._backend import backend, get_backend, set_backend  # noqa: E402
from .options import set_linear_impl, set_qk_norm  # noqa: E402


def patch_model(model, *args, **kwargs):
    """Swap the reference model's modules for kernel-backed ones (see :mod:`internvl_kernels.patch`)."""
    from .patch import patch_model as _patch

    return _patch(model, *args, **kwargs)


def unpatch_model(model):
    """Undo :func:`patch_model` in place and return the model."""
    from .patch import unpatch_model as _unpatch

    return _unpatch(model)


def status(device=None) -> dict:
    """Versions, the CUDA extension and which backend each op uses here and why
    (:mod:`internvl_kernels.status_report`; ``python -m internvl_kernels`` prints it)."""
    from .status_report import status as _status

    return _status(device)


__all__ = ["__version__", "backend", "get_backend", "set_backend", "patch_model", "unpatch_model", "status",
           "set_qk_norm", "set_linear_impl"]
