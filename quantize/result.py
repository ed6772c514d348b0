"""The result of quantizing one Linear: integer codes, scales, zeros, g_idx, the dequantized weight, and packing."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from internvl_kernels.quant import formats
from ._threads import single_thread_on_cpu

__all__ = ["QuantResult"]


@dataclass
class QuantResult:
    """One quantized Linear (``weight [out, in]`` ≈ ``dequantized``).

    * ``intweight`` int32 ``[out, in]`` codes in ``[0, 2**bits)``;
    * ``scales`` fp32 ``[groups, out]`` (exactly representable in fp16, which is how they are stored);
    * ``zeros`` int32 ``[groups, out]`` true zero points;
    * ``g_idx`` int32 ``[in]`` group of each input channel (permuted by act-order);
    * ``input_scale`` (AWQ only) fp32 ``[in]``: the codes quantize ``weight * input_scale`` (columns scaled); in a
      model that factor is folded into the preceding op, so the *stored* weight is ``dequantized_stored`` and the
      effective weight in the original input space is ``dequantized = dequantized_stored / input_scale``;
    * ``perm`` the act-order permutation (quantization order), or ``None``.
    """

    intweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    method: str
    dtype: torch.dtype = torch.float32
    input_scale: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    static_groups: bool = False
    info: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.intweight.shape)

    @property
    def dequantized_stored(self) -> torch.Tensor:
        """``(q - zero[g_idx]) * scale[g_idx]`` — what the packed tensors decode to (fp32)."""
        with single_thread_on_cpu(self.intweight.device):
            g = self.g_idx.long()
            return (self.intweight.to(torch.float32) - self.zeros.to(torch.float32)[g].t()) * self.scales[g].t()

    @property
    def dequantized(self) -> torch.Tensor:
        """The effective weight in the original Linear's input space, same shape and dtype as the input weight."""
        w = self.dequantized_stored
        if self.input_scale is not None:
            w = w / self.input_scale.to(torch.float32)[None, :]
        return w.to(self.dtype)

    @property
    def act_order_g_idx(self) -> bool:
        """True when ``g_idx`` is not the natural ``arange(in) // group_size`` (a runtime must honour it)."""
        natural = formats.make_g_idx(self.g_idx.numel(), self.group_size, device=self.g_idx.device)
        return not torch.equal(natural, self.g_idx.to(natural.dtype))

    def check_format(self, fmt: str) -> str | None:
        """Why this result cannot be stored in ``fmt`` (``None`` when it can)."""
        try:
            f = formats.get_format(fmt)
        except ValueError as e:
            return str(e)
        out_f, in_f = self.shape
        min_zero = int(self.zeros.min()) if self.zeros.numel() else None
        ok, why = f.can_store(in_f, out_f, self.bits, self.group_size, min_zero=min_zero, strict=True)
        if not ok:
            return why
        if not f.has_g_idx and self.act_order_g_idx:
            return f"{f.label} has no g_idx: act-order (without static groups) needs a GPTQ format"
        return None

    def pack(self, fmt: str) -> dict[str, torch.Tensor]:
        """Stored tensors ``{qweight, qzeros, scales (fp16)[, g_idx]}`` in ``fmt`` (gptq | gptq_v2 | awq)."""
        why = self.check_format(fmt)
        if why:
            raise ValueError(f"cannot store this {self.shape[0]}x{self.shape[1]} Linear as {fmt}: {why}")
        iw, z = self.intweight.cpu(), self.zeros.cpu()
        scales = self.scales.cpu().to(torch.float16)
        if not torch.equal(scales.to(torch.float32), self.scales.cpu().to(torch.float32)):
            raise AssertionError("scales are not fp16-exact")
        f = formats.get_format(fmt)
        qweight, qzeros = f.pack(iw, z, self.bits)
        out = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        if f.has_g_idx:
            out["g_idx"] = self.g_idx.cpu().to(torch.int32)
        return out

    def relative_error(self, weight: torch.Tensor, H: torch.Tensor | None = None) -> float:
        """``‖W − Ŵ‖ / ‖W‖`` (Frobenius), or with ``H = E[x xᵀ]`` the output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` (sqrt)."""
        w = weight.to(torch.float32)
        d = w - self.dequantized.to(torch.float32).to(w.device)
        if H is None:
            return float(d.norm() / w.norm().clamp_min(1e-30))
        H = H.to(w.device, torch.float32)
        num = ((d @ H) * d).sum()
        den = ((w @ H) * w).sum().clamp_min(1e-30)
        return float((num.clamp_min(0) / den).sqrt())

    def to(self, device) -> "QuantResult":
        for name in ("intweight", "scales", "zeros", "g_idx", "input_scale", "perm"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self
