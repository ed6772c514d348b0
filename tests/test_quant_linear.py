"""QuantLinear: construction from quantize_linear results / packed tensors / state dicts, forward parity with the
fake-quantized dense Linear (eager and Triton), dtype handling, act-order detection, memory accounting."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import internvl_kernels
import quantize
from internvl_kernels.ops import _common
from internvl_kernels.quant import QuantLinear, dequantize


def _linear(in_f=256, out_f=96, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, in_f**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


METHODS = [("rtn", "gptq", False), ("gptq", "gptq", True), ("gptq", "gptq_v2", False), ("awq", "awq", False),
           ("rtn", "gptq_v2", False)]


@pytest.mark.parametrize("method,layout,act", METHODS)
def test_from_linear_matches_dequantized_weight(method, layout, act):
    lin = _linear()
    calib = torch.randn(512, 256)
    r = quantize.quantize_linear(lin.weight.detach(), calib, method=method, bits=4, group_size=64, act_order=act,
                                 min_zero=1 if layout == "gptq" else 0)
    q = QuantLinear.from_linear(lin, r, layout=layout)
    assert q.act_order == act
    x = torch.randn(3, 7, 256)
    ref = F.linear(x, r.dequantized.float(), lin.bias)
    with internvl_kernels.set_backend("eager"):
        y = q(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-6)  # same fp32 math up to summation order
    with internvl_kernels.set_backend("triton"), _common.poison_outputs():
        n0 = _common.launches("quant_matmul")
        yt = q(x)
        assert _common.launches("quant_matmul") > n0
    assert torch.isfinite(yt).all()
    torch.testing.assert_close(yt, ref, rtol=1e-5, atol=1e-5)
    # the module's dense twin is the fake-quantized Linear
    torch.testing.assert_close(q.dequantize_weight(), r.dequantized.float(), rtol=0, atol=1e-7)
    dense = q.to_linear(torch.float32)
    torch.testing.assert_close(dense(x), ref, rtol=1e-6, atol=1e-6)


def test_checkpoint_names_and_strict_state_dict_roundtrip():
    lin = _linear(128, 64)
    r = quantize.quantize_linear(lin.weight.detach(), method="rtn", bits=4, group_size=32, min_zero=1)
    q = QuantLinear.from_linear(lin, r, layout="gptq")
    sd = q.state_dict()
    assert set(sd) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    packed = r.pack("gptq")
    for k in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(sd[k], packed[k]), k
    assert sd["qweight"].dtype == torch.int32 and sd["scales"].dtype == torch.float16
    # an empty module built on meta loads a checkpoint dict strictly (exact checkpoint key names)
    empty = QuantLinear(128, 64, bits=4, group_size=32, layout="gptq", bias=True, dtype=torch.float32, device="meta")
    assert empty._act_order is None
    empty.load_state_dict(sd, strict=True, assign=True)
    assert empty.act_order is False
    x = torch.randn(5, 128)
    assert torch.equal(empty(x), q(x))
    awq = QuantLinear(128, 64, 4, 32, "awq", bias=False)
    assert set(awq.state_dict()) == {"qweight", "qzeros", "scales"}
    assert awq.qweight.shape == (128, 8) and awq.qzeros.shape == (4, 8) and awq.scales.shape == (4, 64)


def test_from_packed_infers_shapes_and_checks_them():
    # 3-bit GPTQ: 32 input rows per 3 int32 rows → K = 24·32/3 = 256; qzeros [8 groups, 64·3/32]
    q = QuantLinear.from_packed(torch.zeros(24, 64, dtype=torch.int32), torch.zeros(8, 6, dtype=torch.int32),
                                torch.ones(8, 64, dtype=torch.float16), bits=3, group_size=32, layout="gptq_v2")
    assert (q.in_features, q.out_features, q.bits) == (256, 64, 3)
    assert torch.equal(q.g_idx, torch.arange(256, dtype=torch.int32) // 32)
    with pytest.raises(ValueError, match=r"scales has shape \(3, 64\) but .* needs \(2, 64\)"):
        QuantLinear.from_packed(torch.zeros(8, 64, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32),
                                torch.ones(3, 64, dtype=torch.float16), bits=4, group_size=32, layout="gptq")
    with pytest.raises(TypeError, match="qweight must be int32"):
        QuantLinear.from_packed(torch.zeros(8, 64, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int32),
                                torch.ones(2, 64, dtype=torch.float16), bits=4, group_size=32, layout="gptq")
    with pytest.raises(ValueError, match="AWQ has no g_idx"):
        QuantLinear.from_packed(torch.zeros(64, 8, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32),
                                torch.ones(2, 64, dtype=torch.float16), torch.zeros(64, dtype=torch.int32),
                                bits=4, group_size=32, layout="awq")
    with pytest.raises(ValueError, match="layout must be one of"):
        QuantLinear(64, 64, 4, 32, "exl2")
    with pytest.raises(ValueError, match="AWQ GEMM is 4-bit only|not supported for layout 'awq'"):
        QuantLinear(64, 64, 8, 32, "awq")


def test_g_idx_values_are_validated_on_load():
    lin = _linear(64, 32, bias=False)
    r = quantize.quantize_linear(lin.weight.detach(), method="rtn", bits=4, group_size=32)
    sd = r.pack("gptq_v2")
    sd["g_idx"] = sd["g_idx"].clone()
    sd["g_idx"][3] = 7  # only 2 groups
    q = QuantLinear(64, 32, 4, 32, "gptq_v2")
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        q.load_state_dict(sd)


def test_act_order_permutation_is_detected_and_used():
    lin = _linear(128, 64, bias=False)
    calib = torch.randn(256, 128) * torch.linspace(0.1, 3, 128)
    r = quantize.quantize_linear(lin.weight.detach(), calib, method="gptq", bits=4, group_size=32, act_order=True)
    q = QuantLinear.from_linear(lin, r, layout="gptq_v2")
    assert q.act_order and "act_order=True" in repr(q)
    # if the runtime ignored g_idx the output would be wrong: compare with the natural-g_idx reading
    x = torch.randn(4, 128)
    wrong = dequantize(q.qweight, q.scales, q.qzeros, None, 4, 32, "gptq_v2")
    right = q(x)
    torch.testing.assert_close(right, F.linear(x, r.dequantized.float()), rtol=1e-5, atol=1e-5)
    assert (F.linear(x, wrong) - right).abs().max() > 1e-2


def test_dtype_conversion_keeps_fp16_scales():
    lin = _linear(128, 64)
    r = quantize.quantize_linear(lin.weight.detach(), method="rtn", bits=4, group_size=32)
    q = QuantLinear.from_linear(lin, r, layout="awq")
    scales = q.scales.clone()
    qb = q.to(torch.bfloat16)
    assert qb is q and q.scales.dtype == torch.float16 and torch.equal(q.scales, scales)
    assert q.bias.dtype == torch.bfloat16 and q.qweight.dtype == torch.int32 and q.dtype == torch.bfloat16
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.float(), r.dequantized.float(), q.bias.float())
    assert float((y.float() - ref).abs().max()) <= 2**-7 * float(ref.abs().max()) + 1e-3
    q.half()
    assert q.scales.dtype == torch.float16 and q.bias.dtype == torch.float16


def test_memory_footprint_is_exact():
    q = QuantLinear(5120, 13824, bits=4, group_size=128, layout="gptq", bias=False, dtype=torch.bfloat16,
                    device="meta")
    qw = 5120 // 8 * 13824 * 4
    qz = 40 * 13824 // 8 * 4
    sc = 40 * 13824 * 2
    gi = 5120 * 4
    assert q.quantized_nbytes() == qw + qz + sc + gi
    assert q.dense_nbytes() == 5120 * 13824 * 2
    fp = q.memory_footprint()
    assert 3.5 < fp["ratio"] < 4.0  # 4-bit + fp16 scales per 128 + zeros vs bf16
    q8 = QuantLinear(5120, 13824, bits=8, group_size=128, layout="gptq_v2", device="meta")
    assert 1.8 < q8.memory_footprint(torch.bfloat16)["ratio"] < 2.0


def test_extra_repr():
    q = QuantLinear(64, 32, 8, -1, "gptq_v2", bias=True)
    assert repr(q) == ("QuantLinear(in_features=64, out_features=32, bits=8, group_size=-1, layout='gptq_v2', "
                       "bias=True)")


def test_from_linear_rejects_mismatched_result():
    lin = _linear(128, 64)
    r = quantize.quantize_linear(_linear(64, 64).weight.detach(), method="rtn", bits=4, group_size=32)
    with pytest.raises(ValueError, match="quantization is for a"):
        QuantLinear.from_linear(lin, r, layout="gptq_v2")
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(2, 2, 1), r)
