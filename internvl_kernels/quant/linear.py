"""``QuantLinear``: a weight-only quantized ``nn.Linear`` whose buffers carry the checkpoint names.

Buffers (exactly the tensor names GPTQ / AWQ checkpoints store under ``<module>.``):

* ``qweight`` int32 — GPTQ ``[in*bits/32, out]`` / AWQ ``[in, out/8]``
* ``qzeros``  int32 — ``[groups, out*bits/32]`` (GPTQ v1: zero − 1; gptq_v2 / AWQ: true zero)
* ``scales``  fp16  — ``[groups, out]`` (kept in the checkpoint's dtype: ``model.to(torch.bfloat16)`` does not round
  them to bf16)
* ``g_idx``   int32 — ``[in]`` (GPTQ layouts only)
* ``bias``    — ``[out]`` in the model dtype (when the Linear has one)

so ``load_state_dict`` of a GPTQ / AWQ checkpoint fills it directly. ``forward`` calls
:func:`internvl_kernels.ops.quant_matmul`; a ``g_idx`` equal to ``arange(in) // group_size`` (no act-order) is
detected when the buffers are loaded and not passed to the kernel (faster path).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..model.functional import dequantize_packed
from ..ops.quant_matmul import quant_matmul
from . import formats

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """Weight-only quantized Linear (GPTQ v1 ``"gptq"``, ``"gptq_v2"`` or ``"awq"`` layout)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 layout: str = "gptq", bias: bool = False, dtype: torch.dtype = torch.float16, device=None,
                 scales_dtype: torch.dtype = torch.float16):
        super().__init__()
        if layout not in formats.FORMATS:
            raise ValueError(f"QuantLinear: layout must be one of {formats.FORMATS}, got {layout!r}")
        fmt = formats.get_format(layout)
        try:
            shapes = fmt.packed_shapes(in_features, out_features, bits, group_size)  # validates bits / shapes
        except ValueError as e:
            raise ValueError(f"QuantLinear: {e}") from None
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = -1 if group_size in (-1, 0, None) else int(group_size)
        self.layout = layout
        self.dtype = dtype
        self.register_buffer("qweight", torch.zeros(shapes["qweight"], dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(shapes["qzeros"], dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(shapes["scales"], dtype=scales_dtype, device=device))
        if fmt.has_g_idx:
            self.register_buffer("g_idx", fmt.default_g_idx(in_features, self.group_size, device=device))
        else:
            self.g_idx = None
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None
        # not in the checkpoint: the AWQ input scale of a standalone ``from_linear`` (x / input_scale before the GEMM)
        self.register_buffer("input_scale", None, persistent=False)
        # act-order is known once real buffers are loaded (None = decide at the next load / first forward)
        self._act_order: bool | None = False if not fmt.has_g_idx or self.qweight.device.type != "meta" else None
        self.register_load_state_dict_post_hook(QuantLinear._after_load)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_packed(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor | None = None, bias: torch.Tensor | None = None, *, bits: int = 4,
                    group_size: int = 128, layout: str = "gptq", dtype: torch.dtype | None = None) -> "QuantLinear":
        """Wrap checkpoint tensors of one Linear (shapes are checked against ``bits`` / ``group_size`` / ``layout``)."""
        if layout not in formats.FORMATS:
            raise ValueError(f"QuantLinear: layout must be one of {formats.FORMATS}, got {layout!r}")
        fmt = formats.get_format(layout)
        out_f = scales.shape[1]
        in_f = fmt.in_features(qweight, bits)
        dtype = dtype or (bias.dtype if bias is not None else torch.float16)
        m = cls(in_f, out_f, bits, group_size, layout, bias=bias is not None, dtype=dtype, device="meta",
                scales_dtype=scales.dtype)
        sd = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        if fmt.has_g_idx:
            if g_idx is None:
                g_idx = fmt.default_g_idx(in_f, group_size, device=qweight.device)
            sd["g_idx"] = g_idx.to(torch.int32)
        elif g_idx is not None:
            raise ValueError("QuantLinear.from_packed: AWQ has no g_idx")
        if bias is not None:
            sd["bias"] = bias.to(dtype)
        m.load_packed_(sd)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantized, layout: str = "gptq") -> "QuantLinear":
        """Build from an ``nn.Linear`` and its quantization (:class:`quantize.QuantResult` from
        ``quantize.quantize_linear``, or a dict of packed tensors ``{qweight, qzeros, scales[, g_idx]}`` plus
        ``bits`` / ``group_size`` keys). The Linear's bias is kept (in its dtype).

        An AWQ result carries ``input_scale`` (the activation scale a model pipeline folds into the preceding op); a
        standalone QuantLinear applies it itself (``x / input_scale``), so ``forward`` matches ``result.dequantized``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        if isinstance(quantized, dict):
            packed = dict(quantized)
            bits, group_size = int(packed.pop("bits")), int(packed.pop("group_size"))
            input_scale = packed.pop("input_scale", None)
        else:
            packed = quantized.pack(layout)
            bits, group_size = int(quantized.bits), int(quantized.group_size)
            input_scale = getattr(quantized, "input_scale", None)
            if tuple(quantized.shape) != (linear.out_features, linear.in_features):
                raise ValueError(f"from_linear: the quantization is for a {tuple(quantized.shape)} weight, the Linear "
                                 f"is [{linear.out_features}, {linear.in_features}]")
        bias = linear.bias.detach() if linear.bias is not None else None
        m = cls.from_packed(packed["qweight"], packed["qzeros"], packed["scales"], packed.get("g_idx"), bias,
                            bits=bits, group_size=group_size, layout=layout, dtype=linear.weight.dtype)
        if m.in_features != linear.in_features or m.out_features != linear.out_features:
            raise ValueError(f"from_linear: packed tensors describe [{m.out_features}, {m.in_features}], the Linear is "
                             f"[{linear.out_features}, {linear.in_features}]")
        if input_scale is not None:
            m.input_scale = input_scale.detach().to(torch.float32).reshape(-1).contiguous()
        return m.to(linear.weight.device)

    def load_packed_(self, tensors: dict) -> "QuantLinear":
        """Assign checkpoint tensors (``qweight, qzeros, scales[, g_idx][, bias]``) after checking their shapes."""
        for name, want in self.state_dict().items():
            got = tensors.get(name)
            if got is None:
                raise ValueError(f"QuantLinear: missing tensor {name!r}")
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"QuantLinear: {name} has shape {tuple(got.shape)} but a {self.layout} "
                                 f"{self.bits}-bit group_size={self.group_size} Linear [{self.out_features}, {self.in_features}] needs "
                                 f"{tuple(want.shape)}")
            if name in ("qweight", "qzeros", "g_idx") and got.dtype not in (torch.int32,):
                raise TypeError(f"QuantLinear: {name} must be int32, got {got.dtype}")
        self.load_state_dict(tensors, strict=True, assign=True)
        return self

    # -- state ----------------------------------------------------------------------------------------------------
    @staticmethod
    def _after_load(module: "QuantLinear", incompatible_keys) -> None:
        module._refresh()

    def _refresh(self) -> None:
        """Check the loaded buffers and decide whether ``g_idx`` is a real act-order permutation."""
        for name in ("qweight", "qzeros"):
            t = getattr(self, name)
            if t.dtype != torch.int32:
                raise TypeError(f"QuantLinear: {name} must be int32, got {t.dtype}")
        if self.qweight.is_meta:
            self._act_order = None
            return
        if self.g_idx is None:
            self._act_order = False
            return
        g = self.g_idx
        if g.dtype != torch.int32:
            self.g_idx = g = g.to(torch.int32)
        n_groups = self.scales.shape[0]
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= n_groups):
            raise ValueError(f"QuantLinear: g_idx values must lie in [0, {n_groups}), got "
                             f"[{int(g.min())}, {int(g.max())}]")
        gs = self.in_features if self.group_size == -1 else self.group_size
        natural = torch.arange(self.in_features, device=g.device, dtype=torch.int32) // gs
        self._act_order = not torch.equal(g, natural)

    @property
    def act_order(self) -> bool:
        if self._act_order is None:
            self._refresh()
        return bool(self._act_order)

    def _apply(self, fn, recurse=True):
        # keep the scales in their checkpoint dtype (fp16): model.to(bf16) must not round them; devices still move
        scales = self.scales
        out = super()._apply(fn, recurse)
        if scales is not None and self.scales is not None and self.scales.dtype != scales.dtype:
            if scales.is_meta or self.scales.is_meta:
                self.scales = self.scales.to(scales.dtype)
            else:
                self.scales = scales.to(device=self.scales.device)
        if self.input_scale is not None and self.input_scale.dtype != torch.float32:
            self.input_scale = self.input_scale.float()
        if self.bias is not None:
            self.dtype = self.bias.dtype
        return out

    # -- compute --------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = (x.to(torch.float32) / self.input_scale).to(x.dtype)
        g_idx = self.g_idx if self.act_order else None
        return quant_matmul(x, self.qweight, self.scales, self.qzeros, g_idx, self.bits, self.group_size,
                            self.layout, bias=self.bias)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense weight ``[out, in]`` these buffers decode to (the input scale, if any, divided out)."""
        w = dequantize_packed(self.qweight, self.scales, self.qzeros, self.g_idx, self.bits, self.group_size,
                              self.layout, dtype=torch.float32)
        if self.input_scale is not None:
            w = w / self.input_scale[None, :]
        return w.to(dtype)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantized weight (the "fake-quantized" float module)."""
        dtype = dtype or self.dtype
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=dtype,
                        device=self.qweight.device)
        with torch.no_grad():
            lin.weight.copy_(self.dequantize_weight(torch.float32))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # -- memory ---------------------------------------------------------------------------------------------------
    def quantized_nbytes(self) -> int:
        """Bytes of every tensor this module holds (packed weight, zeros, scales, g_idx, bias)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.qzeros, self.scales, self.g_idx,
                                                            self.bias, self.input_scale) if t is not None)

    def dense_nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the same Linear takes unquantized in ``dtype`` (default: the module dtype)."""
        es = torch.empty((), dtype=dtype or self.dtype).element_size()
        return (self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)) * es

    def memory_footprint(self, dtype: torch.dtype | None = None) -> dict:
        q, d = self.quantized_nbytes(), self.dense_nbytes(dtype)
        return {"quantized_bytes": q, "dense_bytes": d, "ratio": d / q if q else float("inf")}

    def extra_repr(self) -> str:
        act = self._act_order
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, layout={self.layout!r}, bias={self.bias is not None}"
                + (", act_order=True" if act else "") + (", input_scale=True" if self.input_scale is not None else ""))
