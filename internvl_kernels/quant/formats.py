"""The on-disk weight-only quantization formats (docs/design.md §2): typed format objects, bit-exact packers and
unpackers, shapes, ``g_idx`` and the ``quantization_config`` JSON.

This module is the bottom of the package: it imports torch only (no model, no kernel, no quantizer). Every rule
about a format (its name, zero-point offset, allowed bits, packed shapes, whether it has ``g_idx``, what it can
store) is written here once, on the :class:`QuantFormat` objects returned by :func:`get_format`.

All packing functions are pure: integer tensors in, integer tensors out.

Conventions
-----------
* ``intweight``: the integer codes of one Linear in **nn.Linear layout ``[out_features, in_features]``**, values in
  ``[0, 2**bits - 1]`` (any integer dtype). ``weight ≈ (intweight - zeros[g_idx].T) * scales[g_idx].T``.
* ``zeros``: the **true** zero points ``[groups, out_features]`` (integers in ``[0, 2**bits - 1]``).
* ``scales``: ``[groups, out_features]``, stored fp16.
* ``g_idx``: int32 ``[in_features]``, the group of every input channel. Without act-order it is
  ``arange(in) // group_size`` (a partial last group when ``group_size`` does not divide ``in``, exactly as AutoGPTQ's
  ``g_idx``); with act-order (desc_act, not static groups) it is a permuted, non-monotonic vector.
* Packed tensors are int32 (two's complement of the uint32 bit pattern the reference tools write).

Formats
-------
**GPTQ v1 (AutoGPTQ, ``checkpoint_format: "gptq"``)** — ``qweight`` int32 ``[in*bits/32, out]``: ``intweight.T``
(``[in, out]``) packed along the input dim as one continuous little-endian bit stream per output column: input row
``j`` occupies stream bits ``[j*bits, (j+1)*bits)`` (4-bit: nibble ``k`` of int32 row ``r`` is input row ``8r+k``).
For 3 bits, 32 values fill 3 int32 rows and values 10 and 21 straddle an int32 boundary, exactly as AutoGPTQ's
``QuantLinear.pack`` does it. ``qzeros`` int32 ``[groups, out*bits/32]``: ``zeros - 1`` packed the same way along the
output dim. v1 therefore cannot store a zero point of 0 (AutoGPTQ's kernels add 1 back without masking);
:func:`pack_gptq` raises on it and the quantizers avoid it (``quantize.rtn.fit_params(..., min_zero=1)``).
**gptq_v2 (``checkpoint_format: "gptq_v2"``, GPTQModel)** — identical, but ``qzeros`` hold the true zero.
**AWQ GEMM (``version: "gemm"``)** — 4-bit only. ``qweight`` int32 ``[in, out/8]``: ``intweight.T`` packed along the
output dim, nibble ``i`` of int32 column ``c`` holding output column ``8c + [0,2,4,6,1,3,5,7][i]``; ``qzeros`` int32
``[groups, out/8]`` true zeros, same order; ``scales`` fp16 ``[groups, out]``; no ``g_idx``; groups are contiguous
(``in % group_size == 0`` is required: AWQ cannot store a partial last group).

Shape requirements (checked, with a clear ``ValueError``): the packed dimension times ``bits`` must be a multiple
of 32 (GPTQ: ``in*bits % 32 == 0`` and ``out*bits % 32 == 0``; AWQ: ``out % 8 == 0``). AutoGPTQ's own shape formula
``in // 32 * bits`` agrees whenever ``in % 32 == 0``; :func:`check_gptq_shape` reports that stricter condition,
which the checkpoint writer enforces so the files load in AutoGPTQ/GPTQModel/vLLM/transformers alike.

Checkpoint layout written by ``python -m quantize`` (what the quantized runtime reads)
-------------------------------------------------------------------------------------
Each quantized ``nn.Linear`` named ``<name>`` is stored as ``<name>.qweight``, ``<name>.qzeros``, ``<name>.scales``
(fp16), ``<name>.g_idx`` (GPTQ formats only) and ``<name>.bias`` (when the Linear has one, in the model dtype).
Every other tensor keeps its official name and 16-bit dtype. ``config.json`` gets ``quantization_config`` and the
folder gets ``quantize_config.json`` (see :func:`quantization_config`).

The written checkpoint keeps the **source checkpoint's layout**. For InternVL-Chat-V1.5 (InternLM2-20B LLM) that is
the InternLM2 layout: ``language_model.model.layers.N.attention.wqkv`` is ONE quantized Linear (q, k and v rows in
InternLM2's GQA-interleaved order ``[kv_heads, q_per_kv + 2, head_dim]``), ``attention.wo``,
``feed_forward.w1/w3/w2`` and ``language_model.output`` — the layout published InternVL-Chat-V1-5 GPTQ/AWQ checkpoints
use and lmdeploy/vLLM load. q, k and v are quantized with the same Hessian (GPTQ) / the same folded input scale (AWQ),
so they share ``g_idx`` and merging them is exact. A runtime that works in Llama layout splits a quantized ``wqkv``
back with :func:`internvl_kernels.checkpoint.internlm2.split_quantized_wqkv` (pure column/row selection; ``qzeros``
and AWQ ``qweight`` are unpacked and repacked). The writer merges with
:func:`internvl_kernels.checkpoint.internlm2.merge_quantized_wqkv`; the two are tested as inverses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

import torch

from ..cpu_threads import cpu_single_threaded

__all__ = [
    "SUPPORTED_BITS",
    "AWQ_ORDER",
    "FORMATS",
    "pack_bits",
    "unpack_bits",
    "pack_gptq",
    "unpack_gptq",
    "pack_awq",
    "unpack_awq",
    "dequantize_gptq",
    "dequantize_awq",
    "dequantize",
    "make_g_idx",
    "check_gptq_shape",
    "check_awq_shape",
    "gptq_v1_to_v2",
    "gptq_v2_to_v1",
    "quantization_config",
    "QuantFormat",
    "get_format",
    "packed_shapes",
    "effective_group_size",
    "GPTQ",
    "GPTQ_V2",
    "AWQ",
]

SUPPORTED_BITS = (2, 3, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_INV_ORDER = tuple(AWQ_ORDER.index(i) for i in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
_MASK32 = 0xFFFFFFFF


def _check_bits(bits: int, allowed: Sequence[int] = SUPPORTED_BITS, what: str = "GPTQ") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{what}: bits must be one of {tuple(allowed)}, got {bits!r}")
    return bits


def _check_int(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")


def _check_range(t: torch.Tensor, bits: int, name: str) -> None:
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi > (1 << bits) - 1:
        raise ValueError(f"{name}: values must lie in [0, {(1 << bits) - 1}] for {bits}-bit, got range [{lo}, {hi}]")


def _to_int32(x64: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 → int32 with the same bits."""
    x64 = x64 & _MASK32
    return torch.where(x64 >= (1 << 31), x64 - (1 << 32), x64).to(torch.int32)


def _layout(bits: int) -> tuple[int, int]:
    """(values per period, int32 words per period) of the continuous bit stream."""
    period_bits = bits * 32 // math.gcd(bits, 32)  # lcm(bits, 32)
    return period_bits // bits, period_bits // 32


@cpu_single_threaded
def pack_bits(values: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack ``values`` (ints in ``[0, 2**bits)``) along ``dim`` into int32 as a little-endian bit stream.

    Value ``j`` along ``dim`` occupies stream bits ``[j*bits, (j+1)*bits)``; word ``w`` holds stream bits
    ``[32w, 32w+32)``. This is AutoGPTQ's packing for 2/3/4/8 bits. ``values.shape[dim] * bits`` must be a multiple of 32.
    """
    _check_bits(bits)
    _check_int(values, "values")
    _check_range(values, bits, "values")
    v = values.to(torch.int64).movedim(dim, 0)
    n = v.shape[0]
    if (n * bits) % 32:
        raise ValueError(f"pack_bits: {n} values of {bits} bits do not fill whole int32 words (n*bits % 32 != 0)")
    per, words = _layout(bits)
    rest = v.shape[1:]
    v = v.reshape(n // per, per, *rest) if n % per == 0 else None
    if v is None:  # only possible for bits=3 with n % 32 != 0, which (n*3) % 32 == 0 already excludes
        raise ValueError(f"pack_bits: {n} values of {bits} bits cannot be packed")
    out = torch.zeros((n // per, words, *rest), dtype=torch.int64, device=values.device)
    for k in range(per):
        off = k * bits
        w, s = divmod(off, 32)
        out[:, w] |= (v[:, k] << s) & _MASK32
        if s + bits > 32:  # straddles into the next word (3-bit only)
            out[:, w + 1] |= v[:, k] >> (32 - s)
    out = out.reshape(n // per * words, *rest)
    return _to_int32(out).movedim(0, dim).contiguous()


@cpu_single_threaded
def unpack_bits(packed: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: int32 words along ``dim`` → int32 values in ``[0, 2**bits)``."""
    _check_bits(bits)
    _check_int(packed, "packed")
    p = packed.to(torch.int64).movedim(dim, 0) & _MASK32
    nw = p.shape[0]
    per, words = _layout(bits)
    if nw % words:
        raise ValueError(f"unpack_bits: {nw} int32 words is not a multiple of {words} for {bits}-bit packing")
    rest = p.shape[1:]
    p = p.reshape(nw // words, words, *rest)
    mask = (1 << bits) - 1
    vals = []
    for k in range(per):
        off = k * bits
        w, s = divmod(off, 32)
        x = p[:, w] >> s
        if s + bits > 32:
            x = x | (p[:, w + 1] << (32 - s))
        vals.append(x & mask)
    out = torch.stack(vals, 1).reshape(nw // words * per, *rest)
    return out.to(torch.int32).movedim(0, dim).contiguous()


# ---------------------------------------------------------------------------------------------------- GPTQ
def _gptq_version(version) -> int:
    if version in (1, "1", "v1", "gptq", FormatName.GPTQ):
        return 1
    if version in (2, "2", "v2", "gptq_v2", FormatName.GPTQ_V2):
        return 2
    raise ValueError(f"GPTQ version must be 1 ('gptq') or 2 ('gptq_v2'), got {version!r}")


def check_gptq_shape(in_features: int, out_features: int, bits: int, strict: bool = True) -> str | None:
    """Why a Linear of this shape cannot be stored as GPTQ (``None`` when it can).

    ``strict`` asks for AutoGPTQ's own condition (``in % 32 == 0`` and ``out % 32 == 0``); otherwise only that the
    bit streams fill whole int32 words.
    """
    _check_bits(bits)
    if strict:
        if in_features % 32 or out_features % 32:
            return (f"GPTQ needs in_features and out_features divisible by 32 (AutoGPTQ's qweight/qzeros shapes), "
                    f"got in={in_features}, out={out_features}")
        return None
    if (in_features * bits) % 32 or (out_features * bits) % 32:
        return f"GPTQ {bits}-bit needs in*bits and out*bits divisible by 32, got in={in_features}, out={out_features}"
    return None


def pack_gptq(intweight: torch.Tensor, zeros: torch.Tensor, bits: int, version=1) -> tuple[torch.Tensor, torch.Tensor]:
    """``intweight [out, in]``, true ``zeros [groups, out]`` → ``(qweight [in*bits/32, out], qzeros [groups, out*bits/32])``.

    ``version`` 1 (AutoGPTQ, qzeros store ``zero - 1``; a zero of 0 raises) or 2 (gptq_v2, true zero).
    """
    bits = _check_bits(bits)
    version = _gptq_version(version)
    _check_int(intweight, "intweight")
    _check_int(zeros, "zeros")
    if intweight.dim() != 2 or zeros.dim() != 2:
        raise ValueError(f"pack_gptq: intweight must be [out, in] and zeros [groups, out], got "
                         f"{tuple(intweight.shape)} and {tuple(zeros.shape)}")
    out_f, in_f = intweight.shape
    if zeros.shape[1] != out_f:
        raise ValueError(f"pack_gptq: zeros has {zeros.shape[1]} columns, intweight has {out_f} output rows")
    why = check_gptq_shape(in_f, out_f, bits, strict=False)
    if why:
        raise ValueError(f"pack_gptq: {why}")
    _check_range(intweight, bits, "intweight")
    _check_range(zeros, bits, "zeros")
    z = zeros.to(torch.int64)
    if version == 1:
        if zeros.numel() and int(zeros.min()) == 0:
            raise ValueError("pack_gptq: GPTQ v1 stores zero-1 and cannot represent a zero point of 0; "
                             "use format 'gptq_v2' or quantize with min_zero=1")
        z = z - 1
    qweight = pack_bits(intweight.t(), bits, dim=0)
    qzeros = pack_bits(z, bits, dim=1)
    return qweight, qzeros


def unpack_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, version=1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_gptq`: → ``(intweight [out, in] int32, zeros [groups, out] int32)`` (true zeros).

    For v1 the stored value plus one is returned, as AutoGPTQ's kernels compute it.
    """
    bits = _check_bits(bits)
    version = _gptq_version(version)
    _check_int(qweight, "qweight")
    _check_int(qzeros, "qzeros")
    if qweight.dim() != 2 or qzeros.dim() != 2:
        raise ValueError("unpack_gptq: qweight and qzeros must be 2-D")
    intweight = unpack_bits(qweight, bits, dim=0).t().contiguous()
    zeros = unpack_bits(qzeros, bits, dim=1)
    if zeros.shape[1] != intweight.shape[0]:
        raise ValueError(f"unpack_gptq: qzeros unpack to {zeros.shape[1]} output columns, qweight has "
                         f"{intweight.shape[0]}")
    if version == 1:
        zeros = zeros + 1
    return intweight, zeros


def make_g_idx(in_features: int, group_size: int, perm: torch.Tensor | None = None, static_groups: bool = False,
               device=None) -> torch.Tensor:
    """AutoGPTQ's ``g_idx`` (int32 ``[in]``).

    ``group_size=-1`` means one group. Without ``perm`` (no act-order) or with ``static_groups``: ``i // group_size``.
    With an act-order permutation ``perm`` (quantization order: column ``perm[t]`` is quantized t-th) the groups
    are contiguous in quantization order: ``g_idx[perm[t]] = t // group_size``.
    """
    gs = in_features if group_size in (-1, None, 0) else int(group_size)
    if gs <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    natural = torch.arange(in_features, device=device, dtype=torch.int64) // gs
    if perm is None or static_groups:
        return natural.to(torch.int32)
    perm = perm.to(device=natural.device, dtype=torch.int64)
    if perm.shape != (in_features,) or not torch.equal(torch.sort(perm).values, torch.arange(in_features, device=perm.device)):
        raise ValueError("make_g_idx: perm must be a permutation of range(in_features)")
    g = torch.empty(in_features, dtype=torch.int64, device=natural.device)
    g[perm] = natural
    return g.to(torch.int32)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int, version=1, dtype=None) -> torch.Tensor:
    """GPTQ tensors → float weight ``[out, in]``: ``(q - zero[g_idx]) * scale[g_idx]`` (in ``dtype`` or the scales' dtype)."""
    intweight, zeros = unpack_gptq(qweight, qzeros, bits, version)
    out_f, in_f = intweight.shape
    if scales.shape != zeros.shape:
        raise ValueError(f"dequantize_gptq: scales {tuple(scales.shape)} and qzeros {tuple(zeros.shape)} disagree")
    if g_idx is None:
        raise ValueError("dequantize_gptq: g_idx is required")
    g_idx = g_idx.to(torch.long)
    if g_idx.shape != (in_f,) or (g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scales.shape[0])):
        raise ValueError(f"dequantize_gptq: g_idx must be [{in_f}] with values in [0, {scales.shape[0]})")
    dtype = dtype or scales.dtype
    s = scales.to(torch.float32)[g_idx].t()  # [out, in]
    z = zeros.to(torch.float32)[g_idx].t()
    return ((intweight.to(torch.float32) - z) * s).to(dtype)


def gptq_v1_to_v2(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Re-pack v1 ``qzeros`` (zero-1) as v2 (true zero). Stored values of ``2**bits - 1`` (zero = 2**bits) raise."""
    z = unpack_bits(qzeros, bits, dim=1) + 1
    if z.numel() and int(z.max()) > (1 << bits) - 1:
        raise ValueError("gptq_v1_to_v2: a v1 zero of 2**bits (stored -1) cannot be represented in v2")
    return pack_bits(z, bits, dim=1)


def gptq_v2_to_v1(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Re-pack v2 ``qzeros`` (true zero) as v1 (zero-1); zeros of 0 raise (v1 cannot store them)."""
    z = unpack_bits(qzeros, bits, dim=1)
    if z.numel() and int(z.min()) == 0:
        raise ValueError("gptq_v2_to_v1: a zero point of 0 cannot be stored in GPTQ v1")
    return pack_bits(z - 1, bits, dim=1)


# ---------------------------------------------------------------------------------------------------- AWQ
def check_awq_shape(in_features: int, out_features: int, group_size: int, bits: int = 4) -> str | None:
    """Why a Linear of this shape cannot be stored as AWQ GEMM (``None`` when it can)."""
    why = AWQ.bits_reason(bits)
    if why:
        return why
    if out_features % 8:
        return f"AWQ GEMM needs out_features divisible by 8, got {out_features}"
    gs = effective_group_size(group_size, in_features)
    if in_features % gs:
        return (f"AWQ cannot store a partial last group: in_features={in_features} is not divisible by "
                f"group_size={gs}")
    return None


def pack_awq(intweight: torch.Tensor, zeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``intweight [out, in]``, true ``zeros [groups, out]`` → AWQ GEMM ``(qweight [in, out/8], qzeros [groups, out/8])``."""
    AWQ.check_bits(bits)
    _check_int(intweight, "intweight")
    _check_int(zeros, "zeros")
    if intweight.dim() != 2 or zeros.dim() != 2:
        raise ValueError("pack_awq: intweight must be [out, in] and zeros [groups, out]")
    out_f, in_f = intweight.shape
    if zeros.shape[1] != out_f:
        raise ValueError(f"pack_awq: zeros has {zeros.shape[1]} columns, intweight has {out_f} output rows")
    if out_f % 8:
        raise ValueError(f"pack_awq: AWQ GEMM needs out_features divisible by 8, got {out_f}")
    _check_range(intweight, bits, "intweight")
    _check_range(zeros, bits, "zeros")
    order = torch.tensor(AWQ_ORDER, device=intweight.device)

    def _pack(x):  # x [rows, out] → [rows, out/8]
        r = x.shape[0]
        x = x.reshape(r, out_f // 8, 8)[:, :, order].reshape(r, out_f)
        return pack_bits(x, 4, dim=1)

    return _pack(intweight.t()), _pack(zeros)


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_awq` → ``(intweight [out, in] int32, zeros [groups, out] int32)``."""
    AWQ.check_bits(bits)
    _check_int(qweight, "qweight")
    _check_int(qzeros, "qzeros")
    inv = torch.tensor(_AWQ_INV_ORDER, device=qweight.device)

    def _unpack(p):
        x = unpack_bits(p, 4, dim=1)
        r, o = x.shape
        return x.reshape(r, o // 8, 8)[:, :, inv].reshape(r, o)

    intweight = _unpack(qweight).t().contiguous()
    zeros = _unpack(qzeros)
    if zeros.shape[1] != intweight.shape[0]:
        raise ValueError(f"unpack_awq: qzeros unpack to {zeros.shape[1]} columns, qweight to {intweight.shape[0]}")
    return intweight, zeros


def dequantize_awq(qweight, qzeros, scales, group_size: int, bits: int = 4, dtype=None) -> torch.Tensor:
    """AWQ GEMM tensors → float weight ``[out, in]``."""
    intweight, zeros = unpack_awq(qweight, qzeros, bits)
    out_f, in_f = intweight.shape
    groups = zeros.shape[0]
    gs = in_f if group_size in (-1, None, 0) else group_size
    if in_f % gs or in_f // gs != groups or scales.shape != zeros.shape:
        raise ValueError(f"dequantize_awq: in_features={in_f}, group_size={gs}, qzeros groups={groups}, "
                         f"scales {tuple(scales.shape)} are inconsistent")
    g_idx = torch.arange(in_f, device=qweight.device) // gs
    dtype = dtype or scales.dtype
    s = scales.to(torch.float32)[g_idx].t()
    z = zeros.to(torch.float32)[g_idx].t()
    return ((intweight.to(torch.float32) - z) * s).to(dtype)


def dequantize(tensors: dict, fmt: str, bits: int, group_size: int = 128, dtype=None) -> torch.Tensor:
    """Dequantize one Linear from its stored tensors ``{"qweight", "qzeros", "scales", ["g_idx"]}`` → ``[out, in]``."""
    return get_format(fmt).dequantize(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"),
                                      bits, group_size, dtype)


# ---------------------------------------------------------------------------------------------------- typed formats
def effective_group_size(group_size, in_features: int) -> int:
    """``group_size`` with ``-1`` (also ``0`` / ``None``) meaning one group over all ``in_features``."""
    if group_size in (-1, 0, None):
        return int(in_features)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int (-1 for one group), got {group_size!r}")
    if group_size < 0:
        raise ValueError(f"group_size must be positive or -1 (one group), got {group_size}")
    return group_size



class UnsupportedQuantizationError(ValueError):
    """A ``quantization_config`` this runtime cannot run (names the field and the supported values)."""

class FormatName(str, Enum):
    """The storage formats by their checkpoint names (``checkpoint_format`` / runtime ``layout``)."""

    GPTQ = "gptq"  # GPTQ v1 (AutoGPTQ): qzeros store zero - 1
    GPTQ_V2 = "gptq_v2"  # GPTQModel: qzeros store the true zero
    AWQ = "awq"  # AutoAWQ GEMM packing


@dataclass(frozen=True)
class QuantFormat:
    """One on-disk weight-only format: its rules, shapes and (un)packing.

    ``zero_offset``: what is subtracted from the true zero point before it is packed (GPTQ v1: 1, so a true zero of
    0 cannot be stored). ``bits``: the widths it can hold. ``has_g_idx``: whether checkpoints carry ``g_idx``
    (act-order); AWQ groups are always contiguous. ``quant_method``: the ``quantization_config`` method name.
    """

    name: str
    quant_method: str
    zero_offset: int
    bits: tuple
    has_g_idx: bool

    def __str__(self) -> str:
        return self.name

    # -- rules -------------------------------------------------------------------------------------------------
    def bits_reason(self, bits) -> str | None:
        """Why ``bits`` cannot be stored in this format (``None`` when it can)."""
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.bits:
            if self.bits == (4,):
                return f"{self.label} is 4-bit only, got bits={bits!r}"
            return f"{self.label}: bits must be one of {self.bits}, got {bits!r}"
        return None

    def check_bits(self, bits) -> int:
        why = self.bits_reason(bits)
        if why:
            raise ValueError(why)
        return bits

    @property
    def label(self) -> str:
        return {"gptq": "GPTQ v1", "gptq_v2": "gptq_v2", "awq": "AWQ GEMM"}[self.name]

    def can_store(self, in_features: int, out_features: int, bits: int, group_size: int = -1, *,
                  min_zero: int | None = None, strict: bool = True) -> tuple[bool, str]:
        """``(ok, reason)``: can a ``[out_features, in_features]`` Linear with these parameters be written in this
        format? ``min_zero`` (the smallest true zero point the quantizer produces, if known) is checked against the
        zero offset; ``strict`` asks for AutoGPTQ's own shape condition (``in % 32 == 0`` and ``out % 32 == 0``),
        which the checkpoint writer enforces so the files load in AutoGPTQ / GPTQModel / vLLM / transformers."""
        why = self.bits_reason(bits)
        if why is None:
            why = (check_awq_shape(in_features, out_features, group_size, bits) if self.name == "awq"
                   else check_gptq_shape(in_features, out_features, bits, strict=strict))
        if why is None and min_zero is not None and min_zero < self.zero_offset:
            why = (f"{self.label} stores zero-{self.zero_offset} and cannot represent a zero point of {min_zero}; "
                   "use format 'gptq_v2' or quantize with min_zero=1")
        return (why is None), (why or "ok")

    def packed_shapes(self, in_features: int, out_features: int, bits: int, group_size: int) -> dict:
        """Shapes of the stored tensors of one ``[out, in]`` Linear: ``qweight``, ``qzeros``, ``scales``, ``g_idx``
        (``None`` where the format has none). Raises ``ValueError`` naming the problem."""
        self.check_bits(bits)
        K, N = in_features, out_features
        gs = effective_group_size(group_size, K)
        G = -(-K // gs)
        if self.name == "awq":
            why = check_awq_shape(K, N, gs, bits)
            if why:
                raise ValueError(why)
            return {"qweight": (K, N // 8), "qzeros": (G, N // 8), "scales": (G, N), "g_idx": None}
        why = check_gptq_shape(K, N, bits, strict=False)
        if why:
            raise ValueError(why)
        return {"qweight": (K * bits // 32, N), "qzeros": (G, N * bits // 32), "scales": (G, N), "g_idx": (K,)}

    def in_features(self, qweight: torch.Tensor, bits: int) -> int:
        """``in_features`` of the Linear a packed ``qweight`` belongs to."""
        return int(qweight.shape[0]) if self.name == "awq" else int(qweight.shape[0]) * 32 // bits

    # -- tensors -----------------------------------------------------------------------------------------------
    def pack(self, intweight: torch.Tensor, zeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``intweight [out, in]``, true ``zeros [groups, out]`` → ``(qweight, qzeros)``."""
        if self.name == "awq":
            return pack_awq(intweight, zeros, bits)
        return pack_gptq(intweight, zeros, bits, self.name)

    def unpack(self, qweight: torch.Tensor, qzeros: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(qweight, qzeros)`` → ``(intweight [out, in] int32, true zeros [groups, out] int32)``."""
        if self.name == "awq":
            return unpack_awq(qweight, qzeros, bits)
        return unpack_gptq(qweight, qzeros, bits, self.name)

    def default_g_idx(self, in_features: int, group_size: int, device=None) -> torch.Tensor | None:
        """The ``g_idx`` a checkpoint without one means (``None`` for formats without ``g_idx``)."""
        return make_g_idx(in_features, group_size, device=device) if self.has_g_idx else None

    def dequantize(self, qweight, qzeros, scales, g_idx, bits: int, group_size: int, dtype=None) -> torch.Tensor:
        """Stored tensors of one Linear → float weight ``[out, in]`` (``g_idx=None``: contiguous groups)."""
        if self.name == "awq":
            if g_idx is not None:
                raise ValueError("dequantize: AWQ has no g_idx")
            return dequantize_awq(qweight, qzeros, scales, group_size, bits, dtype=dtype)
        if g_idx is None:
            g_idx = make_g_idx(self.in_features(qweight, bits), group_size, device=qweight.device)
        return dequantize_gptq(qweight, qzeros, scales, g_idx, bits, self.name, dtype=dtype)


GPTQ = QuantFormat(FormatName.GPTQ.value, "gptq", 1, SUPPORTED_BITS, True)
GPTQ_V2 = QuantFormat(FormatName.GPTQ_V2.value, "gptq", 0, SUPPORTED_BITS, True)
AWQ = QuantFormat(FormatName.AWQ.value, "awq", 0, (4,), False)
_BY_NAME = {f.name: f for f in (GPTQ, GPTQ_V2, AWQ)}
FORMATS = tuple(_BY_NAME)


def get_format(fmt) -> QuantFormat:
    """The :class:`QuantFormat` named ``fmt`` (``"gptq"`` = v1, ``"gptq_v2"``, ``"awq"``, or a :class:`FormatName`)."""
    if isinstance(fmt, QuantFormat):
        return fmt
    name = fmt.value if isinstance(fmt, FormatName) else fmt
    f = _BY_NAME.get(name) if isinstance(name, str) else None
    if f is None:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    return f


def packed_shapes(in_features: int, out_features: int, bits: int, group_size: int, fmt) -> dict:
    """Shapes of the stored tensors of one quantized Linear in format ``fmt`` (see :meth:`QuantFormat.packed_shapes`)."""
    return get_format(fmt).packed_shapes(in_features, out_features, bits, group_size)


# ---------------------------------------------------------------------------------------------------- configs
def quantization_config(fmt: str, bits: int, group_size: int, sym: bool, desc_act: bool = False,
                        static_groups: bool = False, damp_percent: float = 0.01, true_sequential: bool = True,
                        modules_to_not_convert: Sequence[str] = (), quantized_modules: Sequence[str] = (),
                        method: str | None = None, extra: dict | None = None) -> dict:
    """The ``quantization_config`` (config.json) / ``quantize_config.json`` dict for a written checkpoint.

    GPTQ fields follow AutoGPTQ/GPTQModel (``checkpoint_format`` "gptq" = v1, "gptq_v2"); AWQ fields follow AutoAWQ /
    transformers (``quant_method: "awq"``, ``zero_point``, ``version: "gemm"``). ``modules_to_not_convert`` names the
    Linears (or module prefixes) left in 16-bit; ``quantized_modules`` names what *is* quantized (our extension).
    ``method`` records the algorithm that produced the codes (gptq / awq / rtn), independent of the storage format.
    """
    f = get_format(fmt)
    fmt = f.name
    gs = -1 if group_size in (None, 0, -1) else int(group_size)
    if f.quant_method == "awq":
        cfg = {"quant_method": "awq", "bits": bits, "w_bit": bits, "group_size": gs, "q_group_size": gs,
               "zero_point": True, "version": "gemm"}
    else:
        cfg = {"quant_method": "gptq", "bits": bits, "group_size": gs, "desc_act": bool(desc_act), "sym": bool(sym),
               "damp_percent": damp_percent, "true_sequential": bool(true_sequential),
               "static_groups": bool(static_groups), "checkpoint_format": fmt, "format": fmt}
    cfg["modules_to_not_convert"] = list(modules_to_not_convert)
    if quantized_modules:
        cfg["quantized_modules"] = list(quantized_modules)
    if method:
        cfg["quantizer"] = {"tool": "internvl-kernels quantize", "method": method}
    if extra:
        cfg.update(extra)
    return cfg
