"""quantize_per_token: dynamic symmetric per-token int8 / fp8 codes — exact against the reference definition."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import DTYPE_IDS, DTYPES, run_kernel
from test_norm_quant import assert_codes_equal

from internvl_kernels import ops
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


@pytest.mark.parametrize("quant_dtype", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, 1, 3200), (2, 97, 200), (1025, 64), (3, 12800), (4, 5, 1000)], ids=str)
def test_matches_reference_exactly(shape, dtype, quant_dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    x[..., 0] = 50.0  # an outlier channel (the reason for per-token scales)
    q, s = run_kernel(ops.quantize_per_token, x, quant_dtype)
    rq, rs = F.quantize_per_token(x, quant_dtype)
    assert_codes_equal(q, rq)
    assert s.dtype == torch.float32 and torch.equal(s, rs)


def test_round_half_to_even(device):
    # rows whose amax is 127 → scale 1: values at .5 exactly must round to even like torch.round
    v = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -126.5]], device=device)
    q, s = run_kernel(ops.quantize_per_token, v)
    assert float(s) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 3, -126]]
    assert torch.equal(q, F.quantize_per_token(v)[0])


def test_fp8_rounding_at_binade_edges(device):
    # values that round up into the next binade (the interpreter's own fp32→fp8 cast gets these wrong)
    v = torch.tensor([[448.0, 125.4, -125.4, 62.0, 0.0176, 0.0019, -3.1e-3, 239.9]], device=device)
    q, s = run_kernel(ops.quantize_per_token, v, "fp8")
    rq, _ = F.quantize_per_token(v, "fp8")
    assert_codes_equal(q, rq)
    assert q.float()[0, 1].item() == 128.0


def test_zero_rows_and_static_scale(device):
    x = torch.zeros(3, 40, device=device)
    x[1] = torch.linspace(-1, 1, 40)
    q, s = run_kernel(ops.quantize_per_token, x)
    assert torch.equal(q[0], torch.zeros_like(q[0])) and torch.equal(q[2], torch.zeros_like(q[2]))
    assert float(s[0]) == pytest.approx(F.AMAX_FLOOR / 127) and float(q[1].abs().max()) == 127
    st = torch.tensor([0.004], device=device)
    q, s = run_kernel(ops.quantize_per_token, x, "int8", st)
    assert torch.equal(q, F.quantize_per_token(x, "int8", st)[0]) and torch.equal(s, torch.full_like(s, 0.004))
    assert int(q[1].max()) == 127 and int(q[1].min()) == -127  # saturated


def test_nan_is_not_hidden(device):
    x = torch.randn(2, 64, device=device)
    x[1, 3] = float("nan")
    _, s = run_kernel(ops.quantize_per_token, x)
    _, rs = F.quantize_per_token(x)
    assert torch.isnan(rs[1]) and torch.isnan(s[1])  # a NaN row gets a NaN scale: the GEMM output shows it
    assert torch.equal(s[0], rs[0])


def test_bad_inputs(device):
    with pytest.raises(TypeError, match="dtype"):
        ops.quantize_per_token(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="quant_dtype"):
        ops.quantize_per_token(torch.ones(2, 3, device=device), "uint8")
