"""Interop: the runtime reads the *published* layouts, checked against packed tensors built by hand in this file.

The expected ``qweight`` / ``qzeros`` are assembled here with plain Python integer loops straight from the layout
definitions (AutoGPTQ's ``QuantLinear.pack`` procedure for 2/3/4/8 bits incl. the 3-bit word-straddling, v1's
zero − 1, AWQ-GEMM's ``[0, 2, 4, 6, 1, 3, 5, 7]`` nibble order) — independent of ``internvl_kernels.quant.formats`` — and the
runtime (dequantize, eager and Triton ``quant_matmul``, QuantLinear, the InternLM2 ``wqkv`` split) must decode them
exactly. Optional: tensors packed by AutoAWQ itself (``autoawq`` installed with ``--no-deps``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import internvl_kernels
from internvl_kernels.ops import _common
from internvl_kernels.ops.quant_matmul import quant_matmul
from internvl_kernels.quant import QuantLinear, dequantize
from internvl_kernels.quant.loading import QuantConfig, split_quantized_wqkv_

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _i32(u: int) -> int:
    u &= 0xFFFFFFFF
    return u - (1 << 32) if u >= 1 << 31 else u


def pack_cols_autogptq(vals: list[int], bits: int) -> list[int]:
    """AutoGPTQ's packing of one column of values (``vals[i]`` = input row i) into int32 words, written as the
    published procedure: 32/bits values per word for 2/4/8 bits; for 3 bits, 10 values per word with the 11th and
    22nd of every 32 split across two words (2 + 1 bits and 1 + 2 bits)."""
    words = []
    i = 0
    n = len(vals)
    if bits in (2, 4, 8):
        per = 32 // bits
        while i < n:
            w = 0
            for j in range(per):
                w |= vals[i + j] << (bits * j)
            words.append(w)
            i += per
        return [_i32(w) for w in words]
    assert bits == 3 and n % 32 == 0
    while i < n:
        w0 = 0
        for j in range(10):
            w0 |= vals[i + j] << (3 * j)
        i += 10
        w0 |= (vals[i] << 30) & 0xFFFFFFFF  # low 2 bits of value 10
        w1 = (vals[i] >> 2) & 1  # its high bit
        i += 1
        for j in range(10):
            w1 |= vals[i + j] << (3 * j + 1)
        i += 10
        w1 |= (vals[i] << 31) & 0xFFFFFFFF  # low bit of value 21
        w2 = (vals[i] >> 1) & 3  # its high 2 bits
        i += 1
        for j in range(10):
            w2 |= vals[i + j] << (3 * j + 2)
        i += 10
        words += [w0, w1, w2]
    return [_i32(w) for w in words]


def hand_pack_gptq(q: torch.Tensor, z: torch.Tensor, bits: int, version: int):
    """q [out, in] codes, z [groups, out] true zeros → (qweight [in*bits/32, out], qzeros [groups, out*bits/32])."""
    out_f, in_f = q.shape
    qw = [pack_cols_autogptq([int(v) for v in q[n]], bits) for n in range(out_f)]  # per output column
    qweight = torch.tensor(qw, dtype=torch.int64).t().contiguous().to(torch.int32)
    zs = z - 1 if version == 1 else z
    qz = [pack_cols_autogptq([int(v) & ((1 << bits) - 1) for v in zs[g]], bits) for g in range(z.shape[0])]
    return qweight, torch.tensor(qz, dtype=torch.int64).to(torch.int32)


def hand_pack_awq(q: torch.Tensor, z: torch.Tensor):
    """AWQ GEMM: int32 column c of row k holds outputs 8c + AWQ_ORDER[i] in nibble i."""
    out_f, in_f = q.shape

    def pack_row(vals):  # vals[n] over output columns
        words = []
        for c in range(out_f // 8):
            w = 0
            for i in range(8):
                w |= int(vals[8 * c + AWQ_ORDER[i]]) << (4 * i)
            words.append(_i32(w))
        return words

    qweight = torch.tensor([pack_row(q[:, k]) for k in range(in_f)], dtype=torch.int64).to(torch.int32)
    qzeros = torch.tensor([pack_row(z[g]) for g in range(z.shape[0])], dtype=torch.int64).to(torch.int32)
    return qweight, qzeros


def random_codes(out_f, in_f, bits, gs, v1, seed):
    g = torch.Generator().manual_seed(seed)
    G = -(-in_f // gs)
    q = torch.randint(0, 2**bits, (out_f, in_f), generator=g)
    z = torch.randint(1 if v1 else 0, 2**bits, (G, out_f), generator=g)
    s = (torch.rand(G, out_f, generator=g) * 0.05 + 0.01).to(torch.float16)
    return q, z, s


def expected_weight(q, z, s, g_idx):
    g = g_idx.long()
    return (q.float() - z.float()[g].t()) * s.float()[g].t()


# ------------------------------------------------------------------------------------------ literal tiny cases
def test_literal_words():
    """One int32 word 0x76543210: GPTQ 4-bit → input rows 0..7 get 0..7; AWQ → output column j gets
    [0, 4, 1, 5, 2, 6, 3, 7][j]."""
    word = 0x76543210
    qweight = torch.full((1, 8), word, dtype=torch.int32)  # GPTQ: [in/8=1, out=8]
    qzeros = torch.zeros(1, 1, dtype=torch.int32)  # v2 zero 0 for all 8 columns
    scales = torch.ones(1, 8, dtype=torch.float16)
    w = dequantize(qweight, scales, qzeros, None, 4, -1, "gptq_v2")  # [out=8, in=8]
    assert torch.equal(w, torch.arange(8.0).repeat(8, 1))
    awq_w = dequantize(torch.full((8, 1), word, dtype=torch.int32), scales, qzeros, None, 4, -1, "awq")
    assert torch.equal(awq_w, torch.tensor([0.0, 4, 1, 5, 2, 6, 3, 7])[:, None].repeat(1, 8))
    # GPTQ v1: a stored zero nibble of 7 means zero = 8 (symmetric 4-bit)
    v1 = dequantize(qweight, scales, torch.full((1, 1), 0x77777777, dtype=torch.int32), None, 4, -1, "gptq")
    assert torch.equal(v1, torch.arange(8.0).repeat(8, 1) - 8)


def test_hand_packer_reproduces_known_3bit_straddle():
    """Value 10 of a 32-value 3-bit run: low 2 bits at the top of word 0, high bit at the bottom of word 1."""
    vals = [0] * 32
    vals[10] = 0b101
    vals[21] = 0b110
    w = pack_cols_autogptq(vals, 3)
    assert (w[0] & 0xFFFFFFFF) >> 30 == 0b01 and (w[1] & 1) == 1
    assert (w[1] & 0xFFFFFFFF) >> 31 == 0 and (w[2] & 3) == 0b11


# ---------------------------------------------------------------------------------------- randomized by hand
CASES = [("gptq", 2), ("gptq", 3), ("gptq", 4), ("gptq", 8), ("gptq_v2", 2), ("gptq_v2", 3), ("gptq_v2", 4),
         ("gptq_v2", 8), ("awq", 4)]


@pytest.mark.parametrize("layout,bits,act_order",
                         [(lay, b, a) for lay, b in CASES for a in ((False, True) if lay != "awq" else (False,))])
def test_runtime_decodes_hand_packed_tensors(layout, bits, act_order):
    out_f, in_f, gs = 32, 64, 16
    q, z, s = random_codes(out_f, in_f, bits, gs, layout == "gptq", seed=bits * 7 + act_order)
    if layout == "awq":
        qweight, qzeros = hand_pack_awq(q, z)
        g_idx = None
        g_eff = torch.arange(in_f) // gs
    else:
        qweight, qzeros = hand_pack_gptq(q, z, bits, 1 if layout == "gptq" else 2)
        if act_order:  # groups contiguous in a permuted quantization order (AutoGPTQ desc_act)
            perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(3))
            g_eff = torch.empty(in_f, dtype=torch.long)
            g_eff[perm] = torch.arange(in_f) // gs
            g_idx = g_eff.to(torch.int32)
        else:
            g_idx, g_eff = None, torch.arange(in_f) // gs
    want = expected_weight(q, z, s, g_eff)
    got = dequantize(qweight, s, qzeros, g_idx, bits, gs, layout)
    assert torch.equal(got, want), "runtime dequantize differs from the published layout"

    x = torch.randn(3, in_f)
    ref = x @ want.t()
    with internvl_kernels.set_backend("eager"):
        y_eager = quant_matmul(x, qweight, s, qzeros, g_idx, bits, gs, layout)
    torch.testing.assert_close(y_eager, ref, rtol=0, atol=1e-6)
    with internvl_kernels.set_backend("triton"), _common.poison_outputs():
        n0 = _common.launches("quant_matmul")
        y_tri = quant_matmul(x, qweight, s, qzeros, g_idx, bits, gs, layout)
        assert _common.launches("quant_matmul") > n0
    torch.testing.assert_close(y_tri, ref, rtol=1e-5, atol=1e-5)
    # and through the module, loaded with the checkpoint tensor names
    m = QuantLinear.from_packed(qweight, qzeros, s, g_idx, bits=bits, group_size=gs, layout=layout,
                                dtype=torch.float32)
    assert torch.equal(m.dequantize_weight(), want)


# -------------------------------------------------------------------------------- InternLM2 wqkv output split
@pytest.mark.parametrize("layout", ["gptq", "gptq_v2", "awq"])
@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 4), (6, 1)])
def test_internlm2_wqkv_split_respects_gqa_interleave(layout, heads, kv):
    """InternLM2 wqkv rows: per kv head h, its g = heads/kv query heads, then its key head, then its value head."""
    hd, hidden, gs, bits = 8, 64, 32, 4
    g = heads // kv
    out_f = (heads + 2 * kv) * hd
    q, z, s = random_codes(out_f, hidden, bits, gs, layout == "gptq", seed=heads * 10 + kv)
    if layout == "awq":
        qweight, qzeros = hand_pack_awq(q, z)
    else:
        qweight, qzeros = hand_pack_gptq(q, z, bits, 1 if layout == "gptq" else 2)
    W = expected_weight(q, z, s, torch.arange(hidden) // gs)
    q_rows, k_rows, v_rows = [], [], []
    for h in range(kv):
        base = h * (g + 2) * hd
        q_rows += list(range(base, base + g * hd))
        k_rows += list(range(base + g * hd, base + (g + 1) * hd))
        v_rows += list(range(base + (g + 1) * hd, base + (g + 2) * hd))
    pre = "model.layers.3."
    sd = {f"{pre}attention.wqkv.qweight": qweight, f"{pre}attention.wqkv.qzeros": qzeros,
          f"{pre}attention.wqkv.scales": s, f"{pre}input_layernorm.weight": torch.ones(hidden)}
    if layout != "awq":
        sd[f"{pre}attention.wqkv.g_idx"] = (torch.arange(hidden) // gs).to(torch.int32)
    cfg = QuantConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": gs, "version": "gemm"}
                                if layout == "awq" else
                                {"quant_method": "gptq", "bits": 4, "group_size": gs, "checkpoint_format": layout})
    done = split_quantized_wqkv_(sd, {"num_attention_heads": heads, "num_key_value_heads": kv, "hidden_size": hidden,
                                      "head_dim": hd}, cfg)
    assert done == [f"{pre}attention.wqkv"]
    assert not any("wqkv" in k for k in sd) and f"{pre}input_layernorm.weight" in sd
    for name, rows in (("q_proj", q_rows), ("k_proj", k_rows), ("v_proj", v_rows)):
        t = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if f".{name}." in k}
        w = dequantize(t["qweight"], t["scales"], t["qzeros"], t.get("g_idx"), bits, gs, layout)
        assert torch.equal(w, W[rows]), name
        if layout != "awq":  # GPTQ packs along the input dim: the output split is a pure column slice
            assert torch.equal(t["qweight"], qweight[:, rows]) and torch.equal(t["scales"], s[:, rows])


# ------------------------------------------------------------------------------------------- AutoAWQ (optional)
def _import_autoawq_gemm():
    """AutoAWQ 0.2.9's GEMM module without ``awq/__init__`` (which imports datasets/transformers-4 model code).

    ``awq`` is a stub package for the import only, and removed again afterwards: a later ``find_spec("awq")`` (this
    module is also imported as ``tests.test_quant_interop``) must see the real, uninitialised package."""
    saved = sys.modules.get("awq")
    if saved is not None and getattr(saved, "__spec__", None) is None:  # a stub left by someone else
        saved = None
    else:
        spec = importlib.util.find_spec("awq")
        if spec is None or spec.origin is None:
            pytest.skip("autoawq is not installed (optional: pip install --no-deps autoawq==0.2.9)")
        stub = types.ModuleType("awq")
        stub.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["awq"] = stub
    try:
        from awq.modules.linear.gemm import WQLinear_GEMM
        from awq.utils import packing_utils
    except Exception as e:  # pragma: no cover - depends on the installed autoawq
        pytest.skip(f"autoawq's GEMM packing cannot be imported here ({type(e).__name__}: {e})")
    finally:
        if saved is not None:
            sys.modules["awq"] = saved
        else:
            sys.modules.pop("awq", None)
    return WQLinear_GEMM, packing_utils


def test_autoawq_packed_linear_loads(tmp_path):
    """Tensors packed by AutoAWQ's own ``WQLinear_GEMM.from_linear`` load into QuantLinear with the checkpoint names,
    decode to AutoAWQ's own ``dequantize_gemm`` and run (a safetensors round trip included)."""
    WQLinear_GEMM, pu = _import_autoawq_gemm()
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    in_f, out_f, gs = 128, 64, 32
    lin = torch.nn.Linear(in_f, out_f, bias=True).half()
    w = lin.weight.detach().float()
    G = in_f // gs
    wg = w.reshape(out_f, G, gs)
    mx, mn = wg.amax(-1), wg.amin(-1)
    scales = ((mx - mn).clamp_min(1e-5) / 15).t().contiguous()  # [G, out]
    zeros = torch.clamp(torch.round(-mn.t() / scales), 0, 15)  # [G, out]
    scales = scales.half().float()
    awq_lin = WQLinear_GEMM.from_linear(lin.float(), 4, gs, scales=scales, zeros=zeros)
    tensors = {k: getattr(awq_lin, k).contiguous() for k in ("qweight", "qzeros", "scales", "bias")}
    save_file(tensors, str(tmp_path / "layer.safetensors"))
    loaded = load_file(str(tmp_path / "layer.safetensors"))
    m = QuantLinear(in_f, out_f, 4, gs, "awq", bias=True, dtype=torch.float16)
    m.load_state_dict(loaded, strict=True)
    # AutoAWQ's own unpack + order reversal, the float math in fp32 (its dequantize_gemm does it in fp16)
    iw, iz = pu.reverse_awq_order(*pu.unpack_awq(awq_lin.qweight, awq_lin.qzeros, 4), 4)
    iw, iz = (iw.long() & 15).float(), (iz.long() & 15).float()
    sc = awq_lin.scales.float()
    theirs = (iw - iz.repeat_interleave(gs, 0)) * sc.repeat_interleave(gs, 0)  # [in, out]
    assert torch.equal(m.dequantize_weight(), theirs.t())
    theirs16 = pu.dequantize_gemm(awq_lin.qweight, awq_lin.qzeros, awq_lin.scales, 4, gs).float()
    torch.testing.assert_close(theirs16, theirs, rtol=2**-10, atol=1e-6)
    x = torch.randn(5, in_f)
    ref = F.linear(x, theirs.t(), awq_lin.bias.float())
    torch.testing.assert_close(m.float()(x), ref, rtol=1e-5, atol=1e-5)
    with internvl_kernels.set_backend("triton"):
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
