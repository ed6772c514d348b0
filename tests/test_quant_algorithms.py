"""RTN / GPTQ / AWQ on single Linears (quantize.quantize_linear), on synthetic but non-trivial data."""
import pytest
import torch

import quantize
from internvl_kernels.quant import formats
from quantize.gptq import Hessian, gptq_quantize


def correlated_inputs(n, d, seed=0, outliers=8):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g) / d ** 0.5 + 0.3 * torch.eye(d)
    x = torch.randn(n, d, generator=g) @ A
    x[:, :outliers] *= 12.0  # activation outlier channels, as real LLM/ViT inputs have
    return x


def out_err(x, W, Wq):
    y = x @ W.t().float()
    return float((y - x @ Wq.t().float()).norm() / y.norm())


def rtn_reference(W, bits, gs, sym):
    """Elementwise min/max RTN written out independently of quantize.rtn (AutoGPTQ's formulas)."""
    maxq = 2 ** bits - 1
    out = torch.empty_like(W)
    for r in range(W.shape[0]):
        for c0 in range(0, W.shape[1], gs):
            w = W[r, c0:c0 + gs]
            lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi if lo < 0 else lo
            scale = float(torch.tensor((hi - lo) / maxq).half().float())
            zero = (maxq + 1) // 2 if sym else round(-lo / scale)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            out[r, c0:c0 + gs] = (q - zero) * scale
    return out


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits,gs", [(4, 32), (3, 48), (2, 64), (8, 40)])
def test_rtn_matches_elementwise_reference(bits, gs, sym):
    g = torch.Generator().manual_seed(bits * 10 + gs)
    W = torch.randn(6, 100, generator=g)  # 100 % gs != 0 → partial last group
    res = quantize.quantize_linear(W, None, "rtn", bits=bits, group_size=gs, sym=sym)
    ref = rtn_reference(W, bits, gs, sym)
    assert torch.allclose(res.dequantized, ref, rtol=0, atol=1e-6)
    assert res.intweight.min() >= 0 and res.intweight.max() <= 2 ** bits - 1
    assert res.scales.shape == (-(-100 // gs), 6)
    assert res.g_idx.tolist() == [i // gs for i in range(100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_linear_contract(method, dtype):
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(64, 96, generator=g) * 0.05).to(dtype)
    x = correlated_inputs(512, 96, seed=2).to(dtype)
    res = quantize.quantize_linear(W, x, method, bits=4, group_size=32)
    assert res.dequantized.shape == W.shape and res.dequantized.dtype == dtype
    assert res.intweight.dtype == torch.int32 and res.zeros.dtype == torch.int32 and res.g_idx.dtype == torch.int32
    assert res.scales.shape == (3, 64) and res.zeros.shape == (3, 64) and res.g_idx.shape == (96,)
    assert torch.isfinite(res.dequantized.float()).all()
    # the stored tensors decode to exactly what the result says
    for fmt in ("gptq_v2", "awq"):
        p = res.pack(fmt)
        assert torch.equal(formats.dequantize(p, fmt, 4, 32, torch.float32), res.dequantized_stored)
    e = out_err(x.float(), W.float(), res.dequantized.float())
    assert 0 < e < 0.2


def test_gptq_with_diagonal_hessian_equals_rtn():
    # With uncorrelated inputs H is diagonal, H^-1's Cholesky factor is diagonal and no error is propagated:
    # GPTQ must then reproduce RTN bit for bit (non-trivial check of the update equations' structure).
    g = torch.Generator().manual_seed(3)
    W = torch.randn(40, 160, generator=g)
    H = torch.diag(torch.rand(160, generator=g) + 0.5)
    for bits, gs in [(4, 64), (3, 32), (2, -1)]:
        r = gptq_quantize(W, H, bits=bits, group_size=gs)
        rt = quantize.quantize_linear(W, None, "rtn", bits=bits, group_size=gs)
        assert torch.equal(r.intweight, rt.intweight) and torch.equal(r.scales, rt.scales)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(128, 256, generator=g) * 0.02
    x = correlated_inputs(2048, 256, seed=bits)
    e_rtn = out_err(x, W, quantize.quantize_linear(W, x, "rtn", bits=bits, group_size=64).dequantized)
    e_gptq = out_err(x, W, quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=64).dequantized)
    e_ao = out_err(x, W, quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=64, act_order=True).dequantized)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)
    assert e_ao < 0.8 * e_rtn, (e_ao, e_rtn)


def test_act_order_g_idx_and_static_groups():
    W = torch.randn(64, 160) * 0.1
    x = correlated_inputs(1024, 160, seed=5)
    r = quantize.quantize_linear(W, x, "gptq", bits=4, group_size=64, act_order=True)
    assert r.perm is not None
    # groups are contiguous in quantization order (descending diag H), with a partial last group of 32
    assert r.g_idx[r.perm].tolist() == [t // 64 for t in range(160)]
    h = torch.diag(x.t() @ x)
    assert torch.equal(r.perm, torch.argsort(h, descending=True, stable=True))
    assert r.act_order_g_idx and "partial last group" in r.check_format("awq")
    r128 = quantize.quantize_linear(W[:, :128], x[:, :128], "gptq", bits=4, group_size=64, act_order=True)
    assert "no g_idx" in r128.check_format("awq")
    p = r.pack("gptq_v2")
    assert torch.equal(formats.dequantize(p, "gptq_v2", 4, 64, torch.float32), r.dequantized_stored)
    s = quantize.quantize_linear(W, x, "gptq", bits=4, group_size=64, act_order=True, static_groups=True)
    assert s.g_idx.tolist() == [i // 64 for i in range(160)] and not s.act_order_g_idx


def test_gptq_dead_columns():
    W = torch.randn(32, 64)
    x = correlated_inputs(256, 64, seed=6)
    x[:, [3, 17, 40]] = 0.0
    r = quantize.quantize_linear(W, x, "gptq", bits=4, group_size=32)
    assert r.info["dead_columns"] == 3
    assert torch.all(r.dequantized[:, [3, 17, 40]] == 0)


def test_gptq_cholesky_retry_increases_damping():
    n = 64
    v = torch.randn(n)
    v = v / v.norm()
    H = torch.eye(n) - 1.05 * torch.outer(v, v)  # one eigenvalue −0.05: damping 0.01 fails, 0.1 works
    r = gptq_quantize(torch.randn(16, n), H, bits=4, group_size=32)
    assert r.info["damp"] == pytest.approx(0.1)
    r2 = gptq_quantize(torch.randn(16, n), torch.eye(n), bits=4, group_size=32)
    assert r2.info["damp"] == pytest.approx(0.01)


@pytest.mark.parametrize("blocks", [1, 3, None])
def test_hessian_running_mean(blocks):
    """Full-GEMM and lower-triangle block accumulation give the running ``2/N Σ xxᵀ``, symmetric, also when H is
    read between batches and batches differ in size, scale and rank."""
    g = torch.Generator().manual_seed(1)
    d = 400 if blocks is None else 48  # None: the automatic split (2 blocks at this width)
    x = torch.randn(300, d, generator=g) * torch.linspace(0.1, 4, 300)[:, None]
    h = Hessian(d, blocks=blocks)
    assert len(h._blocks) == (blocks or 2)
    for i, chunk in enumerate(torch.split(x, 70)):
        h.add(chunk.reshape(-1, 2, d) if i == 1 and chunk.shape[0] % 2 == 0 else chunk)  # 3-D batches too
        if i % 2:
            assert torch.allclose(h.H, h.H.t(), rtol=1e-6, atol=1e-6)
    ref = 2 * x.double().t() @ x.double() / 300
    assert h.n == 300 and torch.allclose(h.H, h.H.t(), rtol=1e-6, atol=1e-6)
    assert float((h.H.double() - ref).abs().max() / ref.abs().max()) < 1e-6


def test_min_zero_for_gptq_v1():
    W = torch.rand(32, 64) + 0.01  # all-positive groups: the plain asymmetric fit gives zero 0
    r0 = quantize.quantize_linear(W, None, "rtn", bits=4, group_size=32)
    assert int(r0.zeros.min()) == 0 and "zero point of 0" in r0.check_format("gptq")
    r1 = quantize.quantize_linear(W, None, "rtn", bits=4, group_size=32, min_zero=1)
    assert int(r1.zeros.min()) >= 1 and r1.check_format("gptq") is None
    p = r1.pack("gptq")
    assert torch.equal(formats.dequantize(p, "gptq", 4, 32, torch.float32), r1.dequantized_stored)
    # the widened grid still covers the group's max: error stays below one step
    step = r1.scales[r1.g_idx.long()].t()
    assert torch.all((W - r1.dequantized).abs() <= step * 0.5 + 1e-6)


def test_awq_scale_and_outliers():
    g = torch.Generator().manual_seed(7)
    W = torch.randn(96, 128, generator=g) * 0.05
    x = torch.randn(2048, 128, generator=g)
    x[:, :4] *= 30.0  # salient input channels
    r = quantize.quantize_linear(W, x, "awq", bits=4, group_size=64)
    assert r.input_scale is not None and r.input_scale.shape == (128,)
    assert torch.allclose(r.dequantized.float(), r.dequantized_stored / r.input_scale[None, :])
    e_awq = out_err(x, W, r.dequantized)
    e_rtn = out_err(x, W, quantize.quantize_linear(W, x, "rtn", bits=4, group_size=64).dequantized)
    assert e_awq < 0.9 * e_rtn, (e_awq, e_rtn)
    assert float(r.input_scale[:4].mean()) > float(r.input_scale[4:].mean())  # salient channels scaled up


def test_determinism():
    W = torch.randn(64, 96)
    x = correlated_inputs(512, 96, seed=8)
    for method in ("gptq", "awq"):
        a = quantize.quantize_linear(W, x, method, bits=3, group_size=32, seed=1)
        b = quantize.quantize_linear(W, x, method, bits=3, group_size=32, seed=1)
        assert torch.equal(a.intweight, b.intweight) and torch.equal(a.scales, b.scales)


def test_errors():
    W = torch.randn(16, 32)
    with pytest.raises(ValueError, match="method must be one of"):
        quantize.quantize_linear(W, None, "squeezellm")
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize.quantize_linear(W, None, "rtn", bits=5)
    with pytest.raises(ValueError, match="needs calibration inputs"):
        quantize.quantize_linear(W, None, "gptq")
    with pytest.raises(ValueError, match="act_order is a GPTQ option"):
        quantize.quantize_linear(W, torch.randn(8, 32), "awq", act_order=True)
    with pytest.raises(ValueError, match="in_features=32"):
        quantize.quantize_linear(W, torch.randn(8, 31), "gptq")
    with pytest.raises(ValueError, match="NaN"):
        quantize.quantize_linear(W, torch.full((8, 32), float("nan")), "gptq")
    with pytest.raises(ValueError, match="group_size"):
        quantize.quantize_linear(W, None, "rtn", group_size=0.5)
    r = quantize.quantize_linear(W, None, "rtn", bits=4, group_size=24)
    with pytest.raises(ValueError, match="partial last group"):
        r.pack("awq")


def test_mse_range_fit_never_worse_than_minmax():
    from quantize.rtn import dequantize_codes, fit_params, fit_params_mse, quantize_codes

    g = torch.Generator().manual_seed(9)
    w = torch.randn(192, 64, generator=g) ** 3  # heavy tails: shrinking the range pays off
    for bits, sym in [(4, False), (3, True), (2, False)]:
        def err(s, z):
            return (dequantize_codes(quantize_codes(w, s, z, bits), s, z) - w).abs().pow(2.4).sum(1)

        e_mm, e_mse = err(*fit_params(w, bits, sym)), err(*fit_params_mse(w, bits, sym))
        assert torch.all(e_mse <= e_mm + 1e-6) and float(e_mse.sum()) < 0.99 * float(e_mm.sum())
    x = correlated_inputs(1024, 64, seed=9)
    r = quantize.quantize_linear(w, x, "gptq", bits=3, group_size=32, mse=True, act_order=True)
    assert torch.equal(formats.dequantize(r.pack("gptq_v2"), "gptq_v2", 3, 32, torch.float32), r.dequantized_stored)


def test_llama_staged_forward_is_the_block_forward():
    """The one-pass staged GPTQ forward of a Llama block (transformers' own LlamaDecoderLayer) equals the module's
    forward bit for bit, captures every Linear's input in true-sequential order, and computes each group's outputs
    only after that group was quantized."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantize.blocks import adapter_for
    from quantize.streams import llm_streams

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    stream = llm_streams(model, [{"input_ids": torch.randint(0, 101, (2, 17))},
                                 {"input_ids": torch.randint(0, 101, (1, 17))}], "cpu")
    ad = adapter_for(model.model.layers[1])
    events = []
    with torch.no_grad():
        ref = [ad.forward(x, kw) for x, kw in stream]
        out = ad.forward_sequential(stream, lambda n, x: events.append(("capture", n, tuple(x.shape))),
                                    lambda g: events.append(("quantize", g)))
    assert all(torch.equal(a, b) for a, b in zip(ref, out))
    order = [e[1] for e in events if e[0] == "capture"]
    assert order == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] * 2 + ["self_attn.o_proj"] * 2 + \
        ["mlp.gate_proj", "mlp.up_proj"] * 2 + ["mlp.down_proj"] * 2
    q_at = [i for i, e in enumerate(events) if e[0] == "quantize"]
    assert [events[i][1] for i in q_at] == [0, 1, 2, 3] and q_at == [6, 9, 14, 17]
    assert events[7][2] == (2, 17, 64) and events[15][2] == (2, 17, 96)  # o_proj / down_proj inputs

    # quantizing inside the stages changes what the later stages see (true-sequential), and the result equals
    # a plain forward of the block with the quantized weights
    def quantize(g):
        for n in ad.sequential[g]:
            lin = ad.module.get_submodule(n)
            lin.weight.data = quantize_linear_rtn(lin.weight.data)

    def quantize_linear_rtn(w):
        from quantize.rtn import rtn_quantize

        return rtn_quantize(w, 4, 32).dequantized

    with torch.no_grad():
        out_q = ad.forward_sequential(stream, lambda n, x: None, quantize)
        ref_q = [ad.forward(x, kw) for x, kw in stream]
    assert all(torch.equal(a, b) for a, b in zip(ref_q, out_q))
    assert not torch.equal(out_q[0], out[0])


def test_group_aware_order():
    from quantize.gptq import group_aware_order

    d = torch.tensor([1.0, 5.0, 2.0, 9.0, 0.0, 3.0, 7.0])  # groups of 3: peaks 5, 9, 7 (a partial last group)
    assert group_aware_order(d, 3).tolist() == [3, 5, 4, 6, 1, 2, 0]
    d = torch.rand(200)
    p = group_aware_order(d, 64)
    assert sorted(p.tolist()) == list(range(200))
    # every run of positions holds exactly one natural group, columns inside it in descending diag
    runs, t = [], 0
    while t < 200:
        g = int(p[t]) // 64
        n = min(64, 200 - g * 64)
        run = p[t:t + n]
        assert {int(c) // 64 for c in run} == {g}
        assert torch.all(d[run][:-1] >= d[run][1:])
        runs.append(g)
        t += n
    peaks = torch.stack([d[g * 64:(g + 1) * 64].max() for g in runs])
    assert sorted(runs) == [0, 1, 2, 3] and torch.all(peaks[:-1] >= peaks[1:])


@pytest.mark.parametrize("bits,gs,in_f", [(4, 64, 160), (3, 32, 96), (4, 48, 224)])
def test_gptq_group_aware_order_natural_g_idx(bits, gs, in_f):
    """GAR processes columns out of order but stores an ordinary no-desc_act layout: natural g_idx, every format
    (AWQ's too) can hold it, the packed tensors decode to exactly what the pipeline uses, each group's parameters
    come from that group's own columns (the codes stay in range and reconstruct within a step)."""
    g = torch.Generator().manual_seed(bits * 100 + gs)
    W = torch.randn(64, in_f, generator=g) * 0.05
    x = correlated_inputs(2048, in_f, seed=gs)
    r = quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=gs, group_order=True)
    n = quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=gs, group_order=False)
    assert r.info["group_order"] and not n.info["group_order"]
    assert r.perm is not None and not torch.equal(r.perm, torch.arange(in_f))
    assert r.g_idx.tolist() == [c // gs for c in range(in_f)] and not r.act_order_g_idx
    assert int(r.intweight.min()) >= 0 and int(r.intweight.max()) <= 2 ** bits - 1
    for fmt in ("gptq", "gptq_v2") + (("awq",) if bits == 4 and in_f % gs == 0 else ()):
        rr = quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=gs, min_zero=1 if fmt == "gptq" else 0)
        assert rr.check_format(fmt) is None, fmt
        dq = formats.dequantize(rr.pack(fmt), fmt, bits, gs, torch.float32)
        assert torch.equal(dq, rr.dequantized_stored), fmt
    e_rtn = out_err(x, W, quantize.quantize_linear(W, x, "rtn", bits=bits, group_size=gs).dequantized)
    assert out_err(x, W, r.dequantized) < 0.8 * e_rtn
    # act-order wins over GAR when asked: desc_act semantics, permuted g_idx
    a = quantize.quantize_linear(W, x, "gptq", bits=bits, group_size=gs, act_order=True, group_order=True)
    assert a.act_order_g_idx and not a.info["group_order"]
