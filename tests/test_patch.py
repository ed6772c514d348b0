"""patch_model / unpatch_model on the reference InternVL (every preset, from_pretrained) and standalone InternViT."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from _kernel_utils import assert_close
from transformers import AutoTokenizer

import internvl_kernels
from internvl_kernels import ops, patch_model, set_backend, unpatch_model
from internvl_kernels.model import IMG_CONTEXT_TOKEN, InternVisionModel, InternVLChatModel
from internvl_kernels.model.testing import PRESETS, write_checkpoint, write_vision_checkpoint
from internvl_kernels.patch import is_patched, patched_modules

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

FP32 = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=3) for p in PRESETS}


@pytest.fixture(scope="module")
def vision_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_vit")
    return {k: write_vision_checkpoint(str(root / k), k, seed=5, num_layers=3) for k in ("6b", "300m")}


def _prompt(model, tok, tiles, question="What is in the image?"):
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = "<img>" + IMG_CONTEXT_TOKEN * model.num_image_token * tiles + "</img>\n" + question
    return tok(text, return_tensors="pt")["input_ids"]


def _classes(model):
    return {name: type(m) for name, m in model.named_modules()}


def _launch_counts(names):
    return {n: ops.launches(n) for n in names}


@torch.no_grad()
@pytest.mark.parametrize("preset", PRESETS)
def test_patched_chat_model_matches_eager(folders, preset, device):
    model = InternVLChatModel.from_pretrained(folders[preset], dtype=torch.float32, device=device)
    tok = AutoTokenizer.from_pretrained(folders[preset])
    tiles = 2 if preset == "v1.5" else 1
    pv = torch.randn(tiles, 3, 56, 56, device=device)
    ids = _prompt(model, tok, tiles).to(device)
    classes = _classes(model)
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}

    feats = model.extract_feature(pv)
    hidden = model.vision_model(pv, output_hidden_states=True).hidden_states
    logits = model(pixel_values=pv, input_ids=ids).logits

    assert patch_model(model) is model
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same tensors, same keys
    names = ("add_rms_norm", "qk_norm_attention", "linear", "pixel_shuffle_layer_norm", "rms_norm")
    before = _launch_counts(names)
    with set_backend("triton"):
        feats_k = model.extract_feature(pv)
        hidden_k = model.vision_model(pv, output_hidden_states=True).hidden_states
        logits_k = model(pixel_values=pv, input_ids=ids).logits
    after = _launch_counts(names)
    assert all(after[n] > before[n] for n in names), (before, after)  # every fused kernel really ran

    assert_close(feats_k, feats, **FP32, what="image features")
    assert len(hidden_k) == len(hidden)
    for i, (a, b) in enumerate(zip(hidden_k, hidden)):
        assert_close(a, b, **FP32, what=f"ViT hidden state {i}")
    assert_close(logits_k, logits, rtol=1e-4, atol=1e-4, what="LLM logits")

    unpatch_model(model)
    assert _classes(model) == classes
    assert not patched_modules(model)
    assert torch.equal(model.extract_feature(pv), feats)  # exactly the original model again
    assert torch.equal(model(pixel_values=pv, input_ids=ids).logits, logits)


@torch.no_grad()
@pytest.mark.parametrize("preset", ["v1.1", "v1.5"])
def test_patched_model_on_the_eager_backend_is_bit_identical(folders, preset):
    # with every op on its eager reference the patched wiring (fused chain, projector path, LLM norms) must
    # reproduce the original model exactly: any mis-wired weight, eps, scale or rounding shows up here
    model = InternVLChatModel.from_pretrained(folders[preset], dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(folders[preset])
    pv = torch.randn(2, 3, 56, 56, dtype=torch.bfloat16)
    ids = _prompt(model, tok, 2)
    ref_feats = model.extract_feature(pv)
    ref_hidden = model.vision_model(pv, output_hidden_states=True).hidden_states
    ref_logits = model(pixel_values=pv, input_ids=ids).logits
    patch_model(model)
    with set_backend("eager"):
        assert torch.equal(model.extract_feature(pv), ref_feats)
        for a, b in zip(model.vision_model(pv, output_hidden_states=True).hidden_states, ref_hidden):
            assert torch.equal(a, b)
        assert torch.equal(model(pixel_values=pv, input_ids=ids).logits, ref_logits)


@torch.no_grad()
@pytest.mark.parametrize("preset", PRESETS)
def test_patched_greedy_chat_gives_the_same_tokens(folders, preset, device):
    model = InternVLChatModel.from_pretrained(folders[preset], dtype=torch.float32, device=device)
    tok = AutoTokenizer.from_pretrained(folders[preset])
    tiles = 1
    pv = torch.randn(tiles, 3, 56, 56, device=device)
    gen = dict(max_new_tokens=8, do_sample=False)
    ids = _prompt(model, tok, tiles).to(device)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    ref_ids = model.generate(pixel_values=pv, input_ids=ids, **kw)
    ref_text = model.chat(tok, pv, "Describe the image.", gen)
    patch_model(model)
    with set_backend("triton"):
        got_ids = model.generate(pixel_values=pv, input_ids=ids, **kw)
        got_text = model.chat(tok, pv, "Describe the image.", gen)
    assert torch.equal(got_ids, ref_ids)
    assert got_text == ref_text


@torch.no_grad()
@pytest.mark.parametrize("kind", ["6b", "300m"])
def test_patched_standalone_vit(vision_folders, kind, device):
    vit = InternVisionModel.from_pretrained(vision_folders[kind], device=device)
    pv = torch.randn(2, 3, 56, 56, device=device)
    ref = vit(pv, output_hidden_states=True)
    ref_feat = vit.forward_features(pv, -2)
    patch_model(vit)
    names = ("add_rms_norm", "qk_norm_attention") if kind == "6b" else ("add_layer_norm", "attention", "layer_norm")
    before = _launch_counts(names)
    with set_backend("triton"):
        got = vit(pv, output_hidden_states=True)
        got_feat = vit.forward_features(pv, -2)
        block = vit.encoder.layers[0](ref.hidden_states[0])  # a single patched block called directly
    assert all(ops.launches(n) > before[n] for n in names)
    assert_close(got.last_hidden_state, ref.last_hidden_state, **FP32)
    assert_close(got.pooler_output, ref.pooler_output, **FP32)
    for a, b in zip(got.hidden_states, ref.hidden_states):
        assert_close(a, b, **FP32)
    assert_close(got_feat, ref_feat, **FP32)
    assert_close(block, ref.hidden_states[1], **FP32)
    unpatch_model(vit)
    assert torch.equal(vit(pv).last_hidden_state, ref.last_hidden_state)


@torch.no_grad()
def test_patched_bf16_model_stays_close(folders, device):
    model = InternVLChatModel.from_pretrained(folders["v1.5"], dtype=torch.bfloat16, device=device)
    pv = torch.randn(2, 3, 56, 56, device=device, dtype=torch.bfloat16)
    ref = model.extract_feature(pv).float()
    ref32 = InternVLChatModel.from_pretrained(folders["v1.5"], dtype=torch.float32, device=device).extract_feature(pv.float())
    patch_model(model)
    with set_backend("triton"):
        got = model.extract_feature(pv).float()
    assert not torch.isnan(got).any()
    # the fused bf16 path is no further from the fp32 model than eager bf16 is (flash-style rule)
    e_k, e_e = (got - ref32).abs().max().item(), (ref - ref32).abs().max().item()
    assert e_k <= 2 * e_e + 1e-2, (e_k, e_e)


def test_patch_is_idempotent_and_selective(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.2"])
    patch_model(model, llm_norms=False)
    first = patched_modules(model)
    assert "" in first and "vision_model.encoder" in first and "vision_model.encoder.layers.0" in first
    assert not any(n.startswith("language_model") for n in first)
    classes = _classes(model)
    patch_model(model, llm_norms=False)  # twice: no-op
    assert _classes(model) == classes
    patch_model(model)  # now add the LLM norms
    assert any(n.startswith("language_model") and n.endswith("norm") for n in patched_modules(model))
    unpatch_model(model)
    assert not patched_modules(model)
    patch_model(model, vision=False, projector=False)
    assert all(n.startswith("language_model") for n in patched_modules(model))
    unpatch_model(model)
    unpatch_model(model)  # unpatching an unpatched model is harmless
    assert type(model) is InternVLChatModel


def test_patched_model_keeps_identity_and_pickles(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.1"])
    params = {n: p for n, p in model.named_parameters()}
    patch_model(model)
    assert isinstance(model, InternVLChatModel) and is_patched(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    clone = copy.deepcopy(model)
    assert is_patched(clone) and type(clone) is type(model)
    restored = pickle.loads(pickle.dumps(model))
    assert type(restored) is type(model)
    unpatch_model(clone)
    assert type(clone) is InternVLChatModel and type(model) is not InternVLChatModel


@torch.no_grad()
def test_patch_model_qk_norm_mode_reaches_the_kernel(vision_folders, device, monkeypatch):
    vit = InternVisionModel.from_pretrained(vision_folders["6b"], device=device)
    pv = torch.randn(1, 3, 56, 56, device=device)
    seen = []
    real = ops.qk_norm_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("qk_norm"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ops, "qk_norm_attention", spy)
    with pytest.raises(ValueError, match="qk_norm must be one of"):
        patch_model(vit, qk_norm="approximately")
    patch_model(vit, qk_norm="exact")
    with set_backend("triton"):
        out = vit(pv).last_hidden_state
    assert seen and set(seen) == {"exact"}
    ref = unpatch_model(vit)(pv).last_hidden_state
    assert_close(out, ref, **FP32)
    assert not any("_ik_qk_norm" in m.__dict__ for m in vit.modules())  # unpatch forgets the mode
    seen.clear()
    patch_model(vit)  # no mode: the process default (None → options.get_qk_norm())
    with set_backend("triton"):
        vit(pv)
    assert seen and set(seen) == {None}


def test_patch_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        patch_model("model")


def test_top_level_api_is_the_patch_module(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.1"])
    assert internvl_kernels.patch_model(model) is model and is_patched(model.vision_model.encoder)
    assert internvl_kernels.unpatch_model(model) is model and not patched_modules(model)


@torch.no_grad()
def test_torch_compile_fullgraph_patched_vit(tmp_path):
    # inductor on CPU (C++ codegen with gcc); 2 blocks keep the compile short and still cover the fused chain
    torch._dynamo.reset()
    vit = InternVisionModel.from_pretrained(write_vision_checkpoint(str(tmp_path), "6b", seed=7, num_layers=2))
    pv = torch.randn(1, 3, 56, 56)
    ref = vit(pv).last_hidden_state
    patch_model(vit)
    compiled = torch.compile(vit, fullgraph=True, backend="inductor")
    with set_backend("triton"):
        got = compiled(pv).last_hidden_state
    assert_close(got, ref, rtol=1e-4, atol=1e-4)
