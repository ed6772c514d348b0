"""External oracles: transformers' own InternVL implementation, and InternLM2's published equations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from internvl_kernels.model import InternVisionModel, InternVLChatModel
from internvl_kernels.model import functional as KF
from internvl_kernels.checkpoint.internlm2 import internlm2_config_to_llama, llama_to_internlm2_state_dict
from internvl_kernels.model.chat import llama_config_from_llm_config
from internvl_kernels.model.testing import randomize_, tiny_vision_config

tf_internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")


def _hf_vision(ours: InternVisionModel, kind: str):
    from transformers.models.internvl import InternVLVisionConfig, InternVLVisionModel

    c = ours.config
    cfg = InternVLVisionConfig(
        hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, image_size=c.image_size, patch_size=c.patch_size,
        norm_type=c.norm_type, use_qk_norm=c.qk_normalization, attention_bias=c.qkv_bias,
        layer_norm_eps=c.layer_norm_eps, hidden_act="gelu", use_mean_pooling=True,
    )
    cfg._attn_implementation = "eager"
    hf = InternVLVisionModel(cfg).eval()
    ours_sd = ours.state_dict()
    sd = {
        "embeddings.cls_token": ours_sd["embeddings.class_embedding"],
        "embeddings.position_embeddings": ours_sd["embeddings.position_embedding"],
        "embeddings.patch_embeddings.projection.weight": ours_sd["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": ours_sd["embeddings.patch_embedding.bias"],
    }
    C = c.hidden_size
    for i in range(c.num_hidden_layers):
        p, q = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        w = ours_sd[p + "attn.qkv.weight"]
        sd[q + "attention.q_proj.weight"], sd[q + "attention.k_proj.weight"], sd[q + "attention.v_proj.weight"] = (
            w[:C], w[C:2 * C], w[2 * C:])
        if c.qkv_bias:
            b = ours_sd[p + "attn.qkv.bias"]
            sd[q + "attention.q_proj.bias"], sd[q + "attention.k_proj.bias"], sd[q + "attention.v_proj.bias"] = (
                b[:C], b[C:2 * C], b[2 * C:])
        if c.qk_normalization:
            sd[q + "attention.q_norm.weight"] = ours_sd[p + "attn.q_norm.weight"]
            sd[q + "attention.k_norm.weight"] = ours_sd[p + "attn.k_norm.weight"]
        sd[q + "attention.projection_layer.weight"] = ours_sd[p + "attn.proj.weight"]
        sd[q + "attention.projection_layer.bias"] = ours_sd[p + "attn.proj.bias"]
        for n in ("fc1", "fc2"):
            for t in ("weight", "bias"):
                sd[q + f"mlp.{n}.{t}"] = ours_sd[p + f"mlp.{n}.{t}"]
        for a, b_ in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            sd[q + f"{b_}.weight"] = ours_sd[p + f"{a}.weight"]
            if c.norm_type == "layer_norm":
                sd[q + f"{b_}.bias"] = ours_sd[p + f"{a}.bias"]
        sd[q + "lambda_1"] = ours_sd[p + "ls1"]
        sd[q + "lambda_2"] = ours_sd[p + "ls2"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "layernorm." not in m or m.startswith("encoder")], missing
    return hf


@pytest.mark.parametrize("kind", ["6b", "300m"])
def test_vit_pixel_shuffle_projector_match_transformers(kind):
    torch.manual_seed(0)
    vcfg = tiny_vision_config(kind, num_layers=3)
    ours = InternVisionModel(vcfg)
    randomize_(ours, seed=1)
    ours.eval()
    hf = _hf_vision(ours, kind)

    # the projector: ours = nn.Sequential(LN, Linear, GELU, Linear) → transformers' InternVLMultiModalProjector
    from transformers import LlamaConfig
    from transformers.models.internvl import InternVLConfig

    llm_hidden = 96
    cfg = InternVLConfig(vision_config=hf.config.to_dict(), text_config=LlamaConfig(hidden_size=llm_hidden).to_dict(),
                         downsample_ratio=0.5, projector_hidden_act="gelu")
    hf_proj = tf_internvl.InternVLMultiModalProjector(cfg).eval()
    g = torch.Generator().manual_seed(3)
    mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(4 * vcfg.hidden_size), torch.nn.Linear(4 * vcfg.hidden_size, llm_hidden),
                               torch.nn.GELU(), torch.nn.Linear(llm_hidden, llm_hidden))
    with torch.no_grad():
        for p in mlp1.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if p.dim() == 1 and p.shape[0] == 4 * vcfg.hidden_size else 0))
    hf_proj.load_state_dict({
        "layer_norm.weight": mlp1[0].weight, "layer_norm.bias": mlp1[0].bias,
        "linear_1.weight": mlp1[1].weight, "linear_1.bias": mlp1[1].bias,
        "linear_2.weight": mlp1[3].weight, "linear_2.bias": mlp1[3].bias,
    })

    pixel_values = torch.randn(2, 3, vcfg.image_size, vcfg.image_size)
    with torch.no_grad():
        ours_out = ours(pixel_values, output_hidden_states=True)
        hf_out = hf(pixel_values, output_hidden_states=True)
        err_last = (ours_out.last_hidden_state - hf_out.last_hidden_state).abs().max().item()
        assert err_last <= 1e-5, err_last
        for a, b in zip(ours_out.hidden_states, hf_out.hidden_states):
            assert (a - b).abs().max().item() <= 1e-5

        tokens = ours_out.last_hidden_state[:, 1:]
        side = int(math.isqrt(tokens.shape[1]))
        ours_ps = KF.pixel_shuffle_grid(tokens.reshape(2, side, side, -1), 0.5, "v2")
        hf_ps = tf_internvl.InternVLModel.pixel_shuffle(None, hf_out.last_hidden_state[:, 1:].reshape(2, side, side, -1), 0.5)
        assert (ours_ps - hf_ps).abs().max().item() <= 1e-5
        ours_feat = mlp1(ours_ps.reshape(2, -1, ours_ps.shape[-1]))
        hf_feat = hf_proj(hf_ps.reshape(2, -1, hf_ps.shape[-1]))
        err = (ours_feat - hf_feat).abs().max().item()
        assert err <= 1e-5, err
        # and our functional projector is the same computation
        ref = KF.mlp_projector(ours_ps.reshape(2, -1, ours_ps.shape[-1]), mlp1[0].weight, mlp1[0].bias,
                               mlp1[1].weight, mlp1[1].bias, mlp1[3].weight, mlp1[3].bias, eps=1e-5)
        assert (ref - ours_feat).abs().max().item() <= 1e-6


# ---------------------------------------------------------------------------------------------------------------
# InternLM2, written here from its published equations (packed GQA-interleaved wqkv, RMSNorm, RoPE, SwiGLU).
def _internlm2_forward(sd: dict, cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    H, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, g, eps = H // nh, nh // nkv, cfg["rms_norm_eps"]
    T = input_ids.shape[1]

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(x):  # x [B, h, T, hd]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = sd["model.tok_embeddings.weight"][input_ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        qkv = h @ sd[p + "attention.wqkv.weight"].T  # [B, T, (nkv·(g+2)·hd)]
        qkv = qkv.reshape(*qkv.shape[:2], nkv, g + 2, hd)
        q = qkv[..., :g, :].reshape(*qkv.shape[:2], nh, hd).transpose(1, 2)
        k = qkv[..., g, :].transpose(1, 2)
        v = qkv[..., g + 1, :].transpose(1, 2)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(*x.shape[:2], H)
        x = x + o @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        ff = F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)
        x = x + ff @ sd[p + "feed_forward.w2.weight"].T
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["output.weight"].T


def test_internlm2_converted_to_llama_matches_direct_equations():
    from transformers import LlamaForCausalLM

    cfg = dict(architectures=["InternLM2ForCausalLM"], vocab_size=101, hidden_size=96, intermediate_size=200,
               num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, rms_norm_eps=1e-6,
               rope_theta=10000.0, rope_scaling=None, bias=False, max_position_embeddings=512)
    llama = LlamaForCausalLM(llama_config_from_llm_config(cfg)).eval()
    llama.config._attn_implementation = "eager"
    randomize_(llama, seed=5, std=0.1)
    # Write InternLM2 weights from our Llama weights and run both (the conversion's inverse is checked exactly below).
    sd_internlm2 = llama_to_internlm2_state_dict(dict(llama.state_dict()), cfg)
    assert "model.layers.0.attention.wqkv.weight" in sd_internlm2 and "output.weight" in sd_internlm2
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        ref = _internlm2_forward(sd_internlm2, cfg, ids)
        out = llama(ids).logits
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * max(1.0, ref.abs().max().item()), err

    from internvl_kernels.checkpoint.internlm2 import internlm2_to_llama_state_dict

    back = internlm2_to_llama_state_dict(sd_internlm2, cfg)
    for k, v in llama.state_dict().items():
        assert torch.equal(back[k], v), k


def test_internlm2_wqkv_split_is_gqa_interleaved():
    """The split must follow InternLM2's row layout [kv_head][q_0..q_{g-1}, k, v][head_dim] — checked on labels."""
    from internvl_kernels.checkpoint.internlm2 import split_wqkv

    cfg = dict(hidden_size=8, num_attention_heads=4, num_key_value_heads=2)
    hd, g = 2, 2
    rows = []
    for kv in range(2):
        for slot in range(g + 2):
            for d in range(hd):
                rows.append([kv, slot, d])
    labels = torch.tensor(rows, dtype=torch.float32)  # [(4 + 4)·2, 3]
    q, k, v = split_wqkv(labels, cfg)
    # query head h belongs to kv head h // g and is slot h % g
    for h in range(4):
        for d in range(hd):
            assert q[h * hd + d].tolist() == [h // g, h % g, d]
    for kv in range(2):
        for d in range(hd):
            assert k[kv * hd + d].tolist() == [kv, g, d]
            assert v[kv * hd + d].tolist() == [kv, g + 1, d]


def test_internlm2_rope_scaling_maps_to_llama():
    kw = internlm2_config_to_llama(dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert kw["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 2.0}
