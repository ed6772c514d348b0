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


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` in grouped order: ``GROUP_M`` row tiles share each column tile of the
    weight while it is in L2 (the GEMM kernels' launch order)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    group_id = pid // group_size
    first_m = group_id * GROUP_M
    gm = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group_size) % gm)
    pid_n = (pid % group_size) // gm
    return pid_m, pid_n
