"""The InternLM2 checkpoint layout ⇄ the Llama layout the models run (V1.5's LLM is InternLM2-20B).

This module is the one place that knows the InternLM2 layout:

* :data:`RENAMES` — InternLM2 module names ↔ HF Llama module names (both directions are derived from it);
* :func:`wqkv_rows` — InternLM2's packed ``attention.wqkv`` rows are GQA-interleaved: viewed as
  ``[num_kv_heads, groups + 2, head_dim, hidden]`` each kv head carries its ``groups`` query heads, then its key
  head, then its value head (``groups = num_heads // num_kv_heads``). RoPE uses the same rotate-half convention as
  HF Llama, so no permutation of q/k rows is needed;
* dense conversion (:func:`internlm2_to_llama_state_dict` / :func:`llama_to_internlm2_state_dict`, used by the model
  loader and ``save_pretrained``) and quantized conversion (:func:`split_quantized_wqkv` /
  :func:`merge_quantized_wqkv`, used by the quantized loader and the checkpoint writer), all built on
  :func:`wqkv_rows`;
* :func:`internlm2_config_to_llama` — the ``llm_config`` conversion.
"""
from __future__ import annotations

import re

import torch

from ..quant import formats
from .config import UnsupportedConfigError

__all__ = [
    "RENAMES", "wqkv_rows", "heads", "split_wqkv", "merge_wqkv", "split_quantized_wqkv", "merge_quantized_wqkv",
    "internlm2_config_to_llama", "internlm2_to_llama_state_dict", "llama_to_internlm2_state_dict",
    "to_internlm2_name", "to_llama_name",
]

# (InternLM2 name part, HF Llama name part); "^" anchors at the start of the key, otherwise a ".x." infix.
RENAMES = (
    ("^model.tok_embeddings.", "^model.embed_tokens."),
    ("^output.", "^lm_head."),
    (".attention.wo.", ".self_attn.o_proj."),
    (".feed_forward.w1.", ".mlp.gate_proj."),
    (".feed_forward.w3.", ".mlp.up_proj."),
    (".feed_forward.w2.", ".mlp.down_proj."),
    (".attention_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
)


def _rename(key: str, to_llama: bool) -> str:
    # names are matched with a trailing "." so module names (no ".weight") convert as well
    k = key + "."
    for a, b in RENAMES:
        src, dst = (a, b) if to_llama else (b, a)
        if src.startswith("^"):
            if k.startswith(src[1:]):
                k = dst[1:] + k[len(src) - 1:]
        elif src in k:
            k = k.replace(src, dst)
    return k[:-1]


def to_llama_name(key: str) -> str:
    """An InternLM2 tensor or module name → its Llama name (``attention.wqkv`` is not renamed: it is split)."""
    return _rename(key, True)


def to_internlm2_name(key: str) -> str:
    """A Llama tensor or module name → its InternLM2 name (``q/k/v_proj`` → ``attention.wqkv``)."""
    m = re.match(r"^(.*)\.self_attn\.[qkv]_proj(\..*)?$", key)
    if m:
        return f"{m.group(1)}.attention.wqkv{m.group(2) or ''}"
    return _rename(key, False)


def heads(cfg) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of an LLM config (dict or config object)."""
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    nh = int(get("num_attention_heads"))
    nkv = int(get("num_key_value_heads", None) or nh)
    hd = int(get("head_dim", None) or get("hidden_size") // nh)
    if nh % nkv:
        raise ValueError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    return nh, nkv, hd


def wqkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row indices of q, k, v (Llama order: heads in order) inside InternLM2's interleaved ``wqkv``."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    g = num_heads // num_kv_heads
    idx = torch.arange(num_kv_heads * (g + 2) * head_dim).reshape(num_kv_heads, g + 2, head_dim)
    return idx[:, :g].reshape(-1), idx[:, g].reshape(-1), idx[:, g + 1].reshape(-1)


# ------------------------------------------------------------------------------------------------------ dense
def split_wqkv(wqkv: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed InternLM2 ``wqkv`` weight ``[(nh + 2·nkv)·hd, hidden]`` (or bias ``[(nh + 2·nkv)·hd]``)."""
    nh, nkv, hd = heads(cfg)
    if wqkv.shape[0] != (nh + 2 * nkv) * hd:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected (heads + 2·kv_heads)·head_dim = "
                         f"{(nh + 2 * nkv) * hd}")
    rows = wqkv_rows(nh, nkv, hd)
    return tuple(wqkv[r.to(wqkv.device)].contiguous() for r in rows)


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`."""
    nh, nkv, hd = heads(cfg)
    rows = wqkv_rows(nh, nkv, hd)
    out = q.new_empty(((nh + 2 * nkv) * hd, *q.shape[1:]))
    for r, t in zip(rows, (q, k, v)):
        out[r.to(out.device)] = t
    return out


def internlm2_to_llama_state_dict(sd: dict, cfg) -> dict:
    """InternLM2 keys (without the ``language_model.`` prefix) → HF Llama keys."""
    out = {}
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        m = re.match(r"^(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)$", key)
        if m:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(t, cfg)):
                out[f"{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part
            continue
        out[to_llama_name(key)] = t
    return out


def llama_to_internlm2_state_dict(sd: dict, cfg) -> dict:
    """HF Llama keys → InternLM2 keys (for writing V1.5-layout checkpoints)."""
    out, pending = {}, {}
    for key, t in sd.items():
        m = re.match(r"^(model\.layers\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if m:
            pending.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        out[to_internlm2_name(key)] = t
    for (layer, kind), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{layer}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"{layer}.attention.wqkv.{kind}"] = merge_wqkv(parts["q"], parts["k"], parts["v"], cfg)
    return out


# ------------------------------------------------------------------------------------------------------ quantized
def merge_quantized_wqkv(q: dict, k: dict, v: dict, num_heads: int, num_kv_heads: int, head_dim: int, fmt: str,
                         bits: int) -> dict:
    """Three quantized Linears (stored tensors, Llama q/k/v) → one InternLM2 ``wqkv`` (stored tensors).

    Each dict holds ``qweight, qzeros, scales`` and optionally ``g_idx`` / ``bias``. The three must share ``g_idx``
    (q, k and v quantized with the same Hessian / input scale), which makes the merge exact.
    """
    f = formats.get_format(fmt)
    if "g_idx" in q and not (torch.equal(q["g_idx"], k["g_idx"]) and torch.equal(q["g_idx"], v["g_idx"])):
        raise ValueError("merge_quantized_wqkv: q, k and v have different g_idx; they must be quantized together")
    rows = wqkv_rows(num_heads, num_kv_heads, head_dim)
    total = sum(r.numel() for r in rows)
    parts = [f.unpack(t["qweight"], t["qzeros"], bits) for t in (q, k, v)]
    in_f, groups = parts[0][0].shape[1], parts[0][1].shape[0]
    iw = torch.empty(total, in_f, dtype=torch.int32)
    z = torch.empty(groups, total, dtype=torch.int32)
    sc = torch.empty(groups, total, dtype=q["scales"].dtype)
    for r, (p_iw, p_z), t in zip(rows, parts, (q, k, v)):
        iw[r] = p_iw
        z[:, r] = p_z
        sc[:, r] = t["scales"]
    qweight, qzeros = f.pack(iw, z, bits)
    out = {"qweight": qweight, "qzeros": qzeros, "scales": sc}
    if "g_idx" in q:
        out["g_idx"] = q["g_idx"].clone()
    if q.get("bias") is not None:
        b = torch.empty(total, dtype=q["bias"].dtype)
        for r, t in zip(rows, (q, k, v)):
            b[r] = t["bias"]
        out["bias"] = b
    return out


def split_quantized_wqkv(wqkv: dict, num_heads: int, num_kv_heads: int, head_dim: int, fmt: str,
                         bits: int) -> tuple[dict, dict, dict]:
    """Inverse of :func:`merge_quantized_wqkv`: one quantized ``wqkv`` → Llama ``(q, k, v)`` stored tensors (a pure
    selection of output columns: scales are column slices, packed tensors are unpacked and repacked)."""
    f = formats.get_format(fmt)
    iw, z = f.unpack(wqkv["qweight"], wqkv["qzeros"], bits)
    outs = []
    for r in wqkv_rows(num_heads, num_kv_heads, head_dim):
        if r.numel() and int(r.max()) >= iw.shape[0]:
            raise ValueError("split_quantized_wqkv: head counts do not match the wqkv shape")
        qweight, qzeros = f.pack(iw[r], z[:, r], bits)
        d = {"qweight": qweight, "qzeros": qzeros, "scales": wqkv["scales"][:, r].contiguous()}
        if "g_idx" in wqkv:
            d["g_idx"] = wqkv["g_idx"].clone()
        if wqkv.get("bias") is not None:
            d["bias"] = wqkv["bias"][r].contiguous()
        outs.append(d)
    return tuple(outs)


# ------------------------------------------------------------------------------------------------------ config
def internlm2_config_to_llama(cfg: dict) -> dict:
    """An InternLM2 ``llm_config`` dict → kwargs for ``transformers.LlamaConfig``."""
    rope_theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            raise UnsupportedConfigError(f"InternLM2 rope_scaling type {kind!r} is not supported (dynamic, linear)")
        rope = {"rope_type": kind, "rope_theta": rope_theta, "factor": float(scaling["factor"])}
    bias = bool(cfg.get("bias", False))
    return dict(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=rope,
        attention_bias=bias,
        mlp_bias=False,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id", 0),
    )
