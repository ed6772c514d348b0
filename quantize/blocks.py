"""Block adapters: what the pipeline needs to know about one transformer block of each supported kind.

* :class:`VitBlock` — ``InternVisionEncoderLayer`` (InternViT-6B: RMSNorm, packed ``attn.qkv`` without bias, QK-norm;
  InternViT-300M: LayerNorm, qkv bias). True-sequential groups ``[qkv] → [proj] → [fc1] → [fc2]``. AWQ scale
  groups: ``norm1 → qkv`` (inspect: the whole attention), ``v-rows of qkv → proj`` (inspect: proj),
  ``norm2 → fc1`` (inspect: the MLP). fc2 gets no scale (GELU sits between fc1 and fc2; scales only fold through
  linear ops) but does get the clipping search.
* :class:`LlamaBlock` — transformers ``LlamaDecoderLayer`` (and the same module names in Mistral/Qwen2-style
  layers). Groups ``[q, k, v] → [o] → [gate, up] → [down]``. AWQ: ``input_layernorm → q/k/v`` (inspect: self_attn),
  ``v → o`` only when ``v.out_features == o.in_features`` (no GQA), ``post_attention_layernorm → gate/up``
  (inspect: mlp), ``up → down`` (inspect: down). Qwen2 / Qwen2.5 layers are this block with a bias on q/k/v: scaling
  q/k/v's input columns leaves their bias untouched (``(W·diag(s))(x/s) + b = Wx + b``), while ``v → o`` divides v's
  rows **and its bias** by ``s`` (v's output is what o sees), which :func:`fold_scale` does for every ``rows`` fold.
* :class:`Phi3Block` — transformers ``Phi3DecoderLayer``: packed ``self_attn.qkv_proj`` (rows q | k | v) and
  ``mlp.gate_up_proj`` (rows gate | up). Groups ``[qkv_proj] → [o_proj] → [gate_up_proj] → [down_proj]``. AWQ:
  ``input_layernorm → qkv_proj``, ``v-rows of qkv_proj → o_proj`` (no GQA only), ``post_attention_layernorm →
  gate_up_proj``, ``up-rows of gate_up_proj → down_proj`` (down's input is ``up ⊙ act(gate)``, linear in up).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["ScaleGroup", "VitBlock", "LlamaBlock", "Phi3Block", "fold_scale"]


@dataclass
class ScaleGroup:
    """Linears sharing one input whose AWQ scale is folded into ``prev``.

    ``prev_kind``: "norm" (RMSNorm/LayerNorm: weight and bias divided) or "rows" (rows ``prev_rows`` of the Linear
    ``prev`` divided). ``inspect``: the module whose output is compared during the search (its first input is the
    group's input).
    """

    name: str
    prev: nn.Module
    prev_kind: str
    linears: list[str]
    inspect: nn.Module
    prev_rows: slice | None = None
    extra: dict = field(default_factory=dict)


def fold_scale(group: ScaleGroup, linears: dict[str, nn.Linear], s: torch.Tensor) -> None:
    """Apply ``s`` exactly: previous op ÷ s (its output channels), the group's Linears' input columns × s."""
    with torch.no_grad():
        if group.prev_kind == "norm":
            w = group.prev.weight
            w.copy_((w.to(torch.float32) / s.to(w.device)).to(w.dtype))
            b = getattr(group.prev, "bias", None)
            if b is not None:
                b.copy_((b.to(torch.float32) / s.to(b.device)).to(b.dtype))
        elif group.prev_kind == "rows":
            rows = group.prev_rows or slice(None)
            w = group.prev.weight
            w[rows] = (w[rows].to(torch.float32) / s.to(w.device)[:, None]).to(w.dtype)
            if group.prev.bias is not None:
                b = group.prev.bias
                b[rows] = (b[rows].to(torch.float32) / s.to(b.device)).to(b.dtype)
        else:
            raise ValueError(f"unknown prev_kind {group.prev_kind!r}")
        for name in group.linears:
            lin = linears[name]
            lin.weight.copy_((lin.weight.to(torch.float32) * s.to(lin.weight.device)[None, :]).to(lin.weight.dtype))


class _Halt(Exception):
    """Stops a sub-module's forward once the wanted input is captured."""


class _Block:
    kind = "block"
    sequential: list[list[str]] = []
    no_clip: set[str] = set()

    def __init__(self, module: nn.Module):
        self.module = module

    def linears(self) -> dict[str, nn.Linear]:
        return {name: self.module.get_submodule(name) for group in self.sequential for name in group}

    def forward(self, x: torch.Tensor, kwargs: dict | None) -> torch.Tensor:
        out = self.module(x, **(kwargs or {}))
        return out[0] if isinstance(out, tuple) else out

    def scale_groups(self) -> list[ScaleGroup]:
        raise NotImplementedError


class VitBlock(_Block):
    kind = "internvit"
    sequential = [["attn.qkv"], ["attn.proj"], ["mlp.fc1"], ["mlp.fc2"]]
    no_clip = {"attn.qkv"}  # produces attention logits (q, k) — AutoAWQ skips clipping there too

    def scale_groups(self) -> list[ScaleGroup]:
        m = self.module
        C = m.attn.proj.in_features
        return [
            ScaleGroup("norm1->qkv", m.norm1, "norm", ["attn.qkv"], m.attn),
            ScaleGroup("v->proj", m.attn.qkv, "rows", ["attn.proj"], m.attn.proj, prev_rows=slice(2 * C, 3 * C)),
            ScaleGroup("norm2->fc1", m.norm2, "norm", ["mlp.fc1"], m.mlp),
        ]


class LlamaBlock(_Block):
    kind = "llama"
    sequential = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    no_clip = {"self_attn.q_proj", "self_attn.k_proj"}
    sink_linears = {"self_attn.k_proj", "self_attn.v_proj"}  # see QuantSettings.sink_weight

    def forward(self, x, kwargs):
        out = self.module(x, **(kwargs or {}))
        return out[0] if isinstance(out, tuple) else out

    def forward_sequential(self, stream, capture, quantize) -> list:
        """One forward of ``stream`` through the block, stage by stage, quantizing on the way (true-sequential GPTQ
        at the cost of a single block forward).

        For each group of :attr:`sequential` in order: ``capture(name, x)`` is called with the input of every Linear
        of the group for every batch, then ``quantize(group_index)`` (which replaces the group's weights), and only
        then are the group's outputs computed — with the quantized weights. The stages follow the Llama decoder layer
        exactly (``h + attn(norm1(h))``, then ``+ mlp(norm2(·))``, the module's own attention and activation), so with
        unchanged weights the result equals :meth:`forward` bit for bit. Returns the block outputs, one per batch.
        """
        m = self.module
        attn, mlp = m.self_attn, m.mlp
        qkv, o, gate_up, down = self.sequential
        # 1. q/k/v see input_layernorm(h)
        for x, _ in stream:
            n1 = m.input_layernorm(x)
            for name in qkv:
                capture(name, n1)
        quantize(0)
        # 2. o_proj sees the attention of the quantized q/k/v: keep it (the float o_proj output is discarded)
        inner = []

        def grab(mod, args):
            inner.append(args[0])
            raise _Halt

        h = attn.o_proj.register_forward_pre_hook(grab)
        try:
            for x, kw in stream:
                kw = {k: v for k, v in (kw or {}).items() if k not in ("use_cache", "cache", "past_key_values")}
                try:
                    attn(hidden_states=m.input_layernorm(x), **kw)
                except _Halt:
                    pass
                capture(o[0], inner[-1])
        finally:
            h.remove()
        quantize(1)
        h2 = [x + attn.o_proj(a) for (x, _), a in zip(stream, inner)]
        del inner
        # 3. gate/up see post_attention_layernorm(h2)
        for x in h2:
            n2 = m.post_attention_layernorm(x)
            for name in gate_up:
                capture(name, n2)
        quantize(2)
        # 4. down_proj sees act(gate(·)) * up(·) of the quantized gate/up
        mid = []

        def grab_mid(mod, args):
            mid.append(args[0])
            raise _Halt

        h = mlp.down_proj.register_forward_pre_hook(grab_mid)
        try:
            for x in h2:
                try:
                    mlp(m.post_attention_layernorm(x))
                except _Halt:
                    pass
                capture(down[0], mid[-1])
        finally:
            h.remove()
        quantize(3)
        out = [x + mlp.down_proj(a) for x, a in zip(h2, mid)]
        return out

    def scale_groups(self) -> list[ScaleGroup]:
        m = self.module
        groups = [ScaleGroup("input_layernorm->qkv", m.input_layernorm, "norm",
                             ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], m.self_attn)]
        v, o = m.self_attn.v_proj, m.self_attn.o_proj
        if v.out_features == o.in_features:  # not GQA: v's output channels are o's input channels one to one
            groups.append(ScaleGroup("v->o", v, "rows", ["self_attn.o_proj"], o))
        groups.append(ScaleGroup("post_attention_layernorm->gate_up", m.post_attention_layernorm, "norm",
                                 ["mlp.gate_proj", "mlp.up_proj"], m.mlp))
        groups.append(ScaleGroup("up->down", m.mlp.up_proj, "rows", ["mlp.down_proj"], m.mlp.down_proj))
        return groups


class Phi3Block(_Block):
    kind = "phi3"
    sequential = [["self_attn.qkv_proj"], ["self_attn.o_proj"], ["mlp.gate_up_proj"], ["mlp.down_proj"]]
    no_clip = {"self_attn.qkv_proj"}  # its q and k rows produce attention logits
    sink_linears: set = set()  # k/v share one Linear (and one Hessian) with q: no k/v-only weighting

    def scale_groups(self) -> list[ScaleGroup]:
        m = self.module
        attn = m.self_attn
        qkv, o = attn.qkv_proj, attn.o_proj
        hd = attn.head_dim
        nh = m.self_attn.config.num_attention_heads
        nkv = m.self_attn.config.num_key_value_heads
        groups = [ScaleGroup("input_layernorm->qkv_proj", m.input_layernorm, "norm", ["self_attn.qkv_proj"], attn)]
        if nkv * hd == o.in_features:  # not GQA
            v_rows = slice((nh + nkv) * hd, (nh + 2 * nkv) * hd)
            groups.append(ScaleGroup("v->o", qkv, "rows", ["self_attn.o_proj"], o, prev_rows=v_rows))
        groups.append(ScaleGroup("post_attention_layernorm->gate_up_proj", m.post_attention_layernorm, "norm",
                                 ["mlp.gate_up_proj"], m.mlp))
        inter = m.mlp.down_proj.in_features
        groups.append(ScaleGroup("up->down", m.mlp.gate_up_proj, "rows", ["mlp.down_proj"], m.mlp.down_proj,
                                 prev_rows=slice(inter, 2 * inter)))
        return groups


def adapter_for(module: nn.Module) -> _Block:
    names = {n for n, _ in module.named_modules()}
    if {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "norm1", "norm2"} <= names:
        return VitBlock(module)
    if {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
            "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"} <= names:
        return LlamaBlock(module)
    if {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "input_layernorm",
            "post_attention_layernorm"} <= names:
        return Phi3Block(module)
    raise ValueError(f"unsupported block type {type(module).__name__}: expected an InternViT encoder layer or a "
                     "Llama-style decoder layer (q/k/v/o_proj, gate/up/down_proj) or a Phi-3 decoder layer "
                     "(qkv_proj, o_proj, gate_up_proj, down_proj)")
