"""Helpers shared by the kernel parity tests (tests/test_<op>.py of internvl_kernels.ops).

* :func:`run_kernel` runs an op with the ``triton`` backend, outputs poisoned with NaN (so an element the kernel does
  not write fails the test) and asserts that Triton kernels were really launched.
* tolerance tables per dtype; :func:`assert_close` (max-abs/rel check, NaN never passes),
  :func:`assert_flash_rule` (error vs an fp64 reference ≤ 2 × eager PyTorch's own error in that dtype + floor).
"""
from __future__ import annotations

import torch

from internvl_kernels import ops, set_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")

# Norm-like ops vs the eager reference in the same dtype: at most ~1 ulp apart (the only differences are the fp32
# summation order / rsqrt of the statistics, which can flip one rounding). Relative to the value, plus a small atol.
NORM_TOL = {
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
# Floors for the flash-attention rule (≈ 1 ulp of a unit-magnitude value in that dtype).
FLASH_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def run_kernel(fn, *args, min_launches: int = 1, **kwargs):
    """``fn(*args)`` with the Triton backend and NaN-poisoned outputs; asserts a kernel launch happened."""
    before = ops.launches()
    with set_backend("triton"), ops.poison_outputs(float("nan")):
        out = fn(*args, **kwargs)
    launched = ops.launches() - before
    assert launched >= min_launches, f"expected Triton launches, got {launched} (did the eager path run?)"
    return out


def run_eager(fn, *args, **kwargs):
    with set_backend("eager"):
        return fn(*args, **kwargs)


def assert_no_nan(t: torch.Tensor, what: str = "output"):
    assert not torch.isnan(t).any(), f"{what} has NaN (an element was not written, or the kernel produced NaN)"


def assert_close(out: torch.Tensor, ref: torch.Tensor, *, rtol: float, atol: float, what: str = "output"):
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert_no_nan(out, what)
    o, r = out.double(), ref.double()
    err = (o - r).abs()
    bound = atol + rtol * r.abs()
    ok = err <= bound  # NaN compares False
    if not bool(ok.all()):
        i = int((err - bound).argmax())
        raise AssertionError(
            f"{what}: {int((~ok).sum())}/{ok.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"worst at flat index {i}: got {o.flatten()[i].item()}, expected {r.flatten()[i].item()}"
        )


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_flash_rule(out: torch.Tensor, eager_lp: torch.Tensor, ref64: torch.Tensor, dtype, what="output",
                      factor: float = 2.0):
    """err(out vs fp64 ref) ≤ factor · err(eager in ``dtype`` vs fp64 ref) + floor."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    assert_no_nan(out, what)
    e_k, e_e = max_err(out, ref64), max_err(eager_lp, ref64)
    floor = FLASH_FLOOR[dtype] * max(1.0, float(ref64.abs().max()) if ref64.numel() else 1.0)
    assert e_k <= factor * e_e + floor, f"{what}: kernel error {e_k:.3g} > {factor} x eager error {e_e:.3g} + {floor:.3g}"
    return e_k, e_e
