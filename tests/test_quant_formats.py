"""Bit-exact packers/unpackers (internvl_kernels.quant.formats): hand-computed layouts, an independent loop oracle, round-trips."""
import itertools

import pytest
import torch

from internvl_kernels.checkpoint.internlm2 import merge_quantized_wqkv, split_quantized_wqkv
from internvl_kernels.quant import formats as F


def u32(x: int) -> int:
    """uint32 bit pattern → the int32 value torch stores."""
    return x - (1 << 32) if x >= (1 << 31) else x


def oracle_pack_stream(values, bits):
    """Independent reference: one python int per column, bit by bit (values: list of columns of ints)."""
    n = len(values)
    words = n * bits // 32
    out = [0] * words
    for j, v in enumerate(values):
        for b in range(bits):
            if (v >> b) & 1:
                pos = j * bits + b
                out[pos // 32] |= 1 << (pos % 32)
    return [u32(w) for w in out]


# ------------------------------------------------------------------------------------------ hand-computed layouts
def test_gptq_v1_4bit_hand_computed():
    # intweight [out=8, in=8]: output row o holds input values (o + k) % 16 for k = 0..7, row 0 = 0..7.
    iw = torch.tensor([[(o + k) % 16 for k in range(8)] for o in range(8)], dtype=torch.int32)
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int32)  # true zeros, one group
    qweight, qzeros = F.pack_gptq(iw, zeros, bits=4, version=1)
    assert qweight.dtype == torch.int32 and qweight.shape == (1, 8)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (1, 1)
    # nibble k of row 0, column o is input row k of output o: column 0 = 0x76543210, column 1 = 0x87654321, ...
    expected = [0x76543210, 0x87654321, 0x98765432, 0xA9876543, 0xBA987654, 0xCBA98765, 0xDCBA9876, 0xEDCBA987]
    assert qweight[0].tolist() == [u32(x) for x in expected]
    # v1 stores zero - 1 = 0..7 along the output dim, low nibble first
    assert qzeros[0, 0].item() == u32(0x76543210)
    # v2 stores the true zero
    _, qz2 = F.pack_gptq(iw, zeros, bits=4, version=2)
    assert qz2[0, 0].item() == u32(0x87654321)
    back, z = F.unpack_gptq(qweight, qzeros, 4, 1)
    assert torch.equal(back, iw) and torch.equal(z, zeros)


def test_gptq_3bit_hand_computed_straddle():
    # 32 input rows → 3 int32 rows; values 10 and 21 straddle word boundaries (AutoGPTQ's 3-bit layout).
    col = [0] * 32
    col[0], col[10], col[11], col[21], col[31] = 7, 0b101, 1, 0b110, 4
    iw = torch.zeros(32, 32, dtype=torch.int32)  # [out=32, in=32]
    iw[0] = torch.tensor(col)
    zeros = torch.full((1, 32), 4, dtype=torch.int32)
    qweight, qzeros = F.pack_gptq(iw, zeros, bits=3, version=2)
    assert qweight.shape == (3, 32) and qzeros.shape == (1, 3)
    # word0: v0=7 at bits 0-2, v10 low two bits (01) at bits 30-31 → 0x40000007
    # word1: v10 bit 2 (1) at bit 0, v11=1 at bits 1-3 → 0x3; v21 bit 0 (0) at bit 31
    # word2: v21 bits 1-2 (11) at bits 0-1, v31=4 at bits 29-31 → 0x80000003
    assert qweight[:, 0].tolist() == [u32(0x40000007), 0x00000003, u32(0x80000003)]
    assert qweight[:, 1:].abs().sum() == 0
    # zeros 4 = 0b100 repeated: stream of 32 values of 3 bits
    assert qzeros[0].tolist() == oracle_pack_stream([4] * 32, 3)
    back, z = F.unpack_gptq(qweight, qzeros, 3, 2)
    assert torch.equal(back, iw) and torch.equal(z, zeros)


def test_awq_hand_computed_order():
    iw = torch.tensor([[o + 1] for o in range(8)], dtype=torch.int32)  # [out=8, in=1], column o holds o+1
    zeros = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1]], dtype=torch.int32)
    qweight, qzeros = F.pack_awq(iw, zeros)
    assert qweight.shape == (1, 1) and qzeros.shape == (1, 1)
    # nibble i holds output column [0,2,4,6,1,3,5,7][i]: values 1,3,5,7,2,4,6,8 → 0x86427531
    assert qweight.item() == u32(0x86427531)
    # zeros columns 0..7 = 8..1 → nibbles 8,6,4,2,7,5,3,1 → 0x13572468
    assert qzeros.item() == u32(0x13572468)
    back, z = F.unpack_awq(qweight, qzeros)
    assert torch.equal(back, iw) and torch.equal(z, zeros)


# ------------------------------------------------------------------------------------------ oracle + round trips
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_bits_matches_oracle(bits):
    g = torch.Generator().manual_seed(bits)
    n, m = 64, 5
    vals = torch.randint(0, 1 << bits, (n, m), generator=g)
    packed = F.pack_bits(vals, bits, dim=0)
    assert packed.shape == (n * bits // 32, m) and packed.dtype == torch.int32
    for c in range(m):
        assert packed[:, c].tolist() == oracle_pack_stream(vals[:, c].tolist(), bits)
    assert torch.equal(F.unpack_bits(packed, bits, dim=0), vals.to(torch.int32))


_SHAPES = [(64, 96, 32), (96, 160, 64), (32, 320, 128), (32, 256, 128)]  # (out, in, group): 160/64, 320/128 partial
_CASES = [(f, b, *s) for f in ("gptq", "gptq_v2") for b in (2, 3, 4, 8) for s in _SHAPES]
_CASES += [("awq", 4, *s) for s in _SHAPES if s[1] % s[2] == 0]  # AWQ cannot store a partial group (error tested)


@pytest.mark.parametrize("fmt,bits,out_f,in_f,gs", _CASES)
def test_roundtrip_every_format_and_bits(fmt, bits, out_f, in_f, gs):
    g = torch.Generator().manual_seed(out_f * 7 + bits)
    groups = -(-in_f // gs)  # partial last group for GPTQ (160/64, 320/128)
    lo = 1 if fmt == "gptq" else 0  # v1 cannot hold zero 0
    iw = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.int32)
    zeros = torch.randint(lo, 1 << bits, (groups, out_f), generator=g, dtype=torch.int32)
    scales = (torch.rand(groups, out_f, generator=g) * 0.1 + 0.01).half()
    if fmt == "awq":
        qweight, qzeros = F.pack_awq(iw, zeros, bits)
        assert qweight.shape == (in_f, out_f // 8) and qzeros.shape == (groups, out_f // 8)
        iw2, z2 = F.unpack_awq(qweight, qzeros, bits)
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        g_idx = torch.arange(in_f) // gs
    else:
        qweight, qzeros = F.pack_gptq(iw, zeros, bits, fmt)
        assert qweight.shape == (in_f * bits // 32, out_f) and qzeros.shape == (groups, out_f * bits // 32)
        iw2, z2 = F.unpack_gptq(qweight, qzeros, bits, fmt)
        g_idx = F.make_g_idx(in_f, gs)
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}
    assert torch.equal(iw2, iw) and torch.equal(z2, zeros)
    # dequantize = (q - z[g_idx]) * s[g_idx], computed here elementwise by hand
    w = F.dequantize(tensors, fmt, bits, gs, dtype=torch.float32)
    gl = g_idx.long()
    ref = (iw.float() - zeros.float()[gl].t()) * scales.float()[gl].t()
    assert torch.equal(w, ref)


def test_v1_v2_conversion_and_zero_zero():
    iw = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    zeros = torch.randint(1, 16, (2, 32), dtype=torch.int32)
    _, qz1 = F.pack_gptq(iw, zeros, 4, 1)
    _, qz2 = F.pack_gptq(iw, zeros, 4, 2)
    assert torch.equal(F.gptq_v1_to_v2(qz1, 4), qz2)
    assert torch.equal(F.gptq_v2_to_v1(qz2, 4), qz1)
    zeros[1, 3] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        F.pack_gptq(iw, zeros, 4, 1)
    _, qz2 = F.pack_gptq(iw, zeros, 4, 2)
    with pytest.raises(ValueError, match="cannot be stored in GPTQ v1"):
        F.gptq_v2_to_v1(qz2, 4)


def test_g_idx_act_order():
    perm = torch.tensor([5, 0, 3, 1, 4, 2])
    g = F.make_g_idx(6, 2, perm)
    # quantization order 5,0 | 3,1 | 4,2 → groups 0 | 1 | 2
    assert g.tolist() == [0, 1, 2, 1, 2, 0]
    assert F.make_g_idx(6, 2, perm, static_groups=True).tolist() == [0, 0, 1, 1, 2, 2]
    assert F.make_g_idx(7, 3).tolist() == [0, 0, 0, 1, 1, 1, 2]  # partial last group
    assert F.make_g_idx(7, -1).tolist() == [0] * 7
    with pytest.raises(ValueError, match="permutation"):
        F.make_g_idx(6, 2, torch.tensor([0, 0, 1, 2, 3, 4]))


def test_clear_errors():
    iw = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    zeros = torch.randint(1, 16, (1, 32), dtype=torch.int32)
    with pytest.raises(ValueError, match="4-bit only"):
        F.pack_awq(iw % 8, zeros % 8, bits=3)
    with pytest.raises(ValueError, match="bits must be one of"):
        F.pack_gptq(iw, zeros, bits=5)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 7\]"):
        F.pack_gptq(iw, zeros % 8, bits=3)
    with pytest.raises(TypeError, match="integer tensor"):
        F.pack_gptq(iw.float(), zeros, bits=4)
    with pytest.raises(ValueError, match="whole int32 words|divisible by 32"):
        F.pack_gptq(torch.zeros(32, 12, dtype=torch.int32), torch.ones(1, 32, dtype=torch.int32), bits=3)
    with pytest.raises(ValueError, match="divisible by 8"):
        F.pack_awq(torch.zeros(12, 8, dtype=torch.int32), torch.zeros(1, 12, dtype=torch.int32))
    assert "partial last group" in F.check_awq_shape(160, 64, 64)
    assert F.check_awq_shape(128, 64, 64) is None
    assert "divisible by 32" in F.check_gptq_shape(48, 64, 4)
    with pytest.raises(ValueError, match="unknown format"):
        F.dequantize({}, "exl2", 4)


@pytest.mark.parametrize("fmt,bits", [("gptq", 4), ("gptq_v2", 3), ("awq", 4)])
def test_internlm2_wqkv_merge_split_inverse(fmt, bits):
    nh, nkv, hd, in_f, gs = 8, 2, 16, 64, 32
    g = torch.Generator().manual_seed(0)
    parts = []
    for n_out in (nh * hd, nkv * hd, nkv * hd):
        iw = torch.randint(0, 1 << bits, (n_out, in_f), generator=g, dtype=torch.int32)
        z = torch.randint(1, 1 << bits, (in_f // gs, n_out), generator=g, dtype=torch.int32)
        pk = F.pack_awq(iw, z, bits) if fmt == "awq" else F.pack_gptq(iw, z, bits, fmt)
        d = {"qweight": pk[0], "qzeros": pk[1], "scales": torch.rand(in_f // gs, n_out, generator=g).half(),
             "bias": torch.randn(n_out, generator=g)}
        if fmt != "awq":
            d["g_idx"] = F.make_g_idx(in_f, gs)
        parts.append((d, iw))
    merged = merge_quantized_wqkv(*[p[0] for p in parts], nh, nkv, hd, fmt, bits)
    # the merged dequantized weight equals the float rows placed in InternLM2's interleaved order
    deq = [F.dequantize(p[0], fmt, bits, gs, torch.float32) for p in parts]
    wm = F.dequantize(merged, fmt, bits, gs, torch.float32)
    gq = nh // nkv
    view = wm.reshape(nkv, gq + 2, hd, in_f)
    assert torch.equal(view[:, :gq].reshape(-1, in_f), deq[0])
    assert torch.equal(view[:, gq].reshape(-1, in_f), deq[1])
    assert torch.equal(view[:, gq + 1].reshape(-1, in_f), deq[2])
    back = split_quantized_wqkv(merged, nh, nkv, hd, fmt, bits)
    for b, (d, _) in zip(back, parts):
        assert set(b) == set(d)
        for key in d:
            assert torch.equal(b[key], d[key]), key


def test_quantization_config_fields():
    c = F.quantization_config("gptq", 4, 128, True, desc_act=True, modules_to_not_convert=["mlp1"],
                              quantized_modules=["language_model"])
    for key in ("quant_method", "bits", "group_size", "desc_act", "sym", "damp_percent", "true_sequential",
                "static_groups", "checkpoint_format", "modules_to_not_convert"):
        assert key in c
    assert c["checkpoint_format"] == "gptq" and c["quant_method"] == "gptq"
    a = F.quantization_config("awq", 4, 64, False)
    assert a["quant_method"] == "awq" and a["version"] == "gemm" and a["zero_point"] is True
