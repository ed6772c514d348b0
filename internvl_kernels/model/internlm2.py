"""InternLM2 ⇄ Llama layout conversion (V1.5's LLM is InternLM2-20B).

InternLM2 is Llama with renamed modules and a packed ``attention.wqkv`` whose rows are GQA-interleaved: viewed as
``[num_kv_heads, groups + 2, head_dim, hidden]`` each kv head carries its ``groups`` query heads, then its key head,
then its value head (``groups = num_heads // num_kv_heads``). RoPE uses the same rotate-half convention as HF Llama,
so no permutation of q/k rows is needed.
"""
from __future__ import annotations

import re

import torch

_RENAMES = [
    (r"^model\.tok_embeddings\.", "model.embed_tokens."),
    (r"^output\.", "lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


def internlm2_config_to_llama(cfg: dict) -> dict:
    """An InternLM2 ``llm_config`` dict → kwargs for ``transformers.LlamaConfig``."""
    rope_theta = float(cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or None
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("dynamic", "linear"):
            from .configuration import UnsupportedConfigError

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


def _dims(cfg: dict):
    nh = cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg["hidden_size"] // nh
    if nh % nkv:
        raise ValueError(f"num_attention_heads={nh} is not a multiple of num_key_value_heads={nkv}")
    return nh, nkv, hd


def split_wqkv(wqkv: torch.Tensor, cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a packed InternLM2 ``wqkv`` weight ``[(nh + 2·nkv)·hd, hidden]`` (or bias ``[(nh + 2·nkv)·hd]``)."""
    nh, nkv, hd = _dims(cfg)
    g = nh // nkv
    if wqkv.shape[0] != (nh + 2 * nkv) * hd:
        raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected (heads + 2·kv_heads)·head_dim = {(nh + 2 * nkv) * hd}")
    rest = wqkv.shape[1:]
    w = wqkv.reshape(nkv, g + 2, hd, *rest)
    q = w[:, :g].reshape(nh * hd, *rest)
    k = w[:, g].reshape(nkv * hd, *rest)
    v = w[:, g + 1].reshape(nkv * hd, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def merge_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: dict) -> torch.Tensor:
    """Inverse of :func:`split_wqkv`."""
    nh, nkv, hd = _dims(cfg)
    g = nh // nkv
    rest = q.shape[1:]
    qg = q.reshape(nkv, g, hd, *rest)
    kg = k.reshape(nkv, 1, hd, *rest)
    vg = v.reshape(nkv, 1, hd, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape((nh + 2 * nkv) * hd, *rest).contiguous()


def internlm2_to_llama_state_dict(sd: dict, cfg: dict) -> dict:
    """InternLM2 keys (without the ``language_model.`` prefix) → HF Llama keys."""
    out = {}
    for key, t in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        m = re.match(r"^(model\.layers\.\d+)\.attention\.wqkv\.(weight|bias)$", key)
        if m:
            q, k, v = split_wqkv(t, cfg)
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{m.group(1)}.self_attn.{name}.{m.group(2)}"] = part
            continue
        new = key
        for pat, rep in _RENAMES:
            new = re.sub(pat, rep, new)
        out[new] = t
    return out


def llama_to_internlm2_state_dict(sd: dict, cfg: dict) -> dict:
    """HF Llama keys → InternLM2 keys (for writing V1.5-layout checkpoints)."""
    inverse = [
        (r"^model\.embed_tokens\.", "model.tok_embeddings."),
        (r"^lm_head\.", "output."),
        (r"\.self_attn\.o_proj\.", ".attention.wo."),
        (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
        (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
        (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
        (r"\.input_layernorm\.", ".attention_norm."),
        (r"\.post_attention_layernorm\.", ".ffn_norm."),
    ]
    out, pending = {}, {}
    for key, t in sd.items():
        m = re.match(r"^(model\.layers\.\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", key)
        if m:
            pending.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = t
            continue
        new = key
        for pat, rep in inverse:
            new = re.sub(pat, rep, new)
        out[new] = t
    for (layer, kind), parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{layer}: q/k/v projections incomplete ({sorted(parts)})")
        out[f"{layer}.attention.wqkv.{kind}"] = merge_wqkv(parts["q"], parts["k"], parts["v"], cfg)
    return out
