"""patch_model on transformers' own InternVL (``InternVLForConditionalGeneration`` / ``InternVLModel``): the same
kernels as on the reference model, identical fp32 features / logits / greedy tokens, reversible."""
from __future__ import annotations

import pytest
import torch
from _kernel_utils import assert_close

from internvl_kernels import ops, patch_model, set_backend, unpatch_model
from internvl_kernels.model.testing import HF_IMAGE_TOKEN_ID, build_hf_internvl
from internvl_kernels.patch import is_patched, patched_modules

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
FP32 = dict(rtol=1e-4, atol=1e-5)


def _ids(tiles, seed=0):
    text = torch.randint(8, 160, (1, 9), generator=torch.Generator().manual_seed(seed))
    return torch.cat([text[:, :4], torch.full((1, 4 * tiles), HF_IMAGE_TOKEN_ID), text[:, 4:]], dim=1)


def _classes(model):
    return {name: type(m) for name, m in model.named_modules()}


@torch.no_grad()
@pytest.mark.parametrize("kind", ["6b", "300m"])
def test_patched_transformers_internvl_matches(kind, device):
    hf = build_hf_internvl(kind, tie=kind == "300m", seed=3).to(device)
    tiles = 2
    pv = torch.randn(tiles, 3, 56, 56, device=device)
    ids = _ids(tiles).to(device)
    classes = _classes(hf)
    ptrs = {k: v.data_ptr() for k, v in hf.state_dict().items()}
    feats = hf.model.get_image_features(pixel_values=pv).pooler_output
    hidden = hf.model.vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states
    logits = hf(input_ids=ids, pixel_values=pv).logits

    assert patch_model(hf) is hf
    names = {n for n in patched_modules(hf)}
    assert "model" in names and "model.vision_tower.encoder" in names and "model.vision_tower.encoder.layer.0" in names
    assert any(n.startswith("model.language_model") and n.endswith("norm") for n in names)  # Qwen2RMSNorm
    assert {k: v.data_ptr() for k, v in hf.state_dict().items()} == ptrs
    ops_run = ("add_rms_norm", "qk_norm_attention") if kind == "6b" else ("add_layer_norm", "attention")
    ops_run += ("linear", "pixel_shuffle_layer_norm", "rms_norm")
    before = {n: ops.launches(n) for n in ops_run}
    with set_backend("triton"):
        feats_k = hf.model.get_image_features(pixel_values=pv).pooler_output
        hidden_k = hf.model.vision_tower(pixel_values=pv, output_hidden_states=True).hidden_states
        logits_k = hf(input_ids=ids, pixel_values=pv).logits
    assert all(ops.launches(n) > before[n] for n in ops_run), {n: (before[n], ops.launches(n)) for n in ops_run}
    assert_close(feats_k, feats, **FP32, what="image features")
    assert len(hidden_k) == len(hidden) == 4  # the recorded per-layer outputs still come out
    for i, (a, b) in enumerate(zip(hidden_k, hidden)):
        assert_close(a, b, **FP32, what=f"vision hidden state {i}")
    assert_close(logits_k, logits, rtol=1e-4, atol=1e-4, what="logits")

    unpatch_model(hf)
    assert _classes(hf) == classes and not patched_modules(hf)
    assert torch.equal(hf.model.get_image_features(pixel_values=pv).pooler_output, feats)
    assert torch.equal(hf(input_ids=ids, pixel_values=pv).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize("kind,layer", [("6b", -1), ("6b", -2), ("300m", -2)])
def test_patched_transformers_internvl_on_the_eager_backend(kind, layer):
    # every op on its eager reference (internvl_kernels.model.functional, written independently of transformers'
    # code: only fp32 summation order differs): any mis-wired weight, eps, layer scale or token order would show up
    # far above this bound. vision_feature_layer -2 takes the path through the recorded hidden states.
    hf = build_hf_internvl(kind, seed=5, feature_layer=layer)
    pv = torch.randn(3, 3, 56, 56)
    ids = _ids(3, seed=2)
    ref_feats = hf.model.get_image_features(pixel_values=pv).pooler_output
    ref_logits = hf(input_ids=ids, pixel_values=pv).logits
    patch_model(hf)
    with set_backend("eager"):
        got = hf.model.get_image_features(pixel_values=pv).pooler_output
        assert not torch.isnan(got).any()
        assert_close(got, ref_feats, rtol=2e-6, atol=2e-6, what="image features")
        assert_close(hf(input_ids=ids, pixel_values=pv).logits, ref_logits, rtol=1e-5, atol=1e-5, what="logits")


@torch.no_grad()
def test_patched_transformers_internvl_greedy_tokens(device):
    hf = build_hf_internvl("6b", seed=8).to(device)
    pv = torch.randn(1, 3, 56, 56, device=device)
    ids = _ids(1, seed=4).to(device)
    kw = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=3)
    ref = hf.generate(input_ids=ids, pixel_values=pv, **kw)
    patch_model(hf)
    assert is_patched(hf.model)
    with set_backend("triton"):
        got = hf.generate(input_ids=ids, pixel_values=pv, **kw)
    assert got.shape[1] == ids.shape[1] + 6
    assert torch.equal(got, ref)


@torch.no_grad()
def test_patch_selective_on_transformers_internvl():
    hf = build_hf_internvl("300m", seed=1)
    patch_model(hf, vision=False, projector=False)
    assert all(n.startswith("model.language_model") for n in patched_modules(hf))
    unpatch_model(hf)
    patch_model(hf.model.vision_tower, projector=False, llm_norms=False)  # the vision tower alone
    assert patched_modules(hf) and all(n.startswith("model.vision_tower") for n in patched_modules(hf))
    unpatch_model(hf)
    assert not patched_modules(hf)
