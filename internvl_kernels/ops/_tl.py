"""Triton device helpers shared by the kernels."""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import INTERPRET

_EMULATE_BF16_RNE = tl.constexpr(INTERPRET)


@triton.jit
def _round_bf16_rne(x):
    # round-to-nearest-even of an fp32 value to the bf16 grid, kept in fp32 (exactly representable in bf16)
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def to_dtype(x, DT: tl.constexpr):
    """``x.to(DT)`` with the GPU's rounding everywhere.

    On a GPU this is the plain conversion (round-to-nearest-even). The Triton interpreter truncates fp32→bf16
    conversions instead; there the value is first rounded to the bf16 grid by bit arithmetic, so interpreter runs
    see the same bf16 values the GPU produces (and the CPU tests can hold the kernels to the GPU's tolerances).
    """
    if _EMULATE_BF16_RNE:
        if DT == tl.bfloat16:
            x = _round_bf16_rne(x.to(tl.float32))
    return x.to(DT)
