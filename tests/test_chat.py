"""End-to-end: every preset loads and chats; image-token splicing; fp32 and bf16."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from internvl_kernels.model import IMG_CONTEXT_TOKEN, InternVLChatModel
from internvl_kernels.model.preprocess import load_image
from internvl_kernels.model.testing import PRESETS, write_checkpoint


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {p: write_checkpoint(str(root / p.replace(".", "_")), p, seed=1) for p in PRESETS}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", PRESETS)
def test_chat_produces_tokens(folders, preset, dtype):
    model = InternVLChatModel.from_pretrained(folders[preset], dtype=dtype)
    tok = AutoTokenizer.from_pretrained(folders[preset])
    max_num = 6 if preset == "v1.5" else 1
    skdata = pytest.importorskip("skimage.data")
    pv = load_image(skdata.astronaut(), input_size=56, max_num=max_num).to(dtype)
    # 512×512 photo at tile size 56: V1.5 tiles it 2×2 + thumbnail; V1.1/V1.2 use one tile
    assert pv.shape[0] == (5 if preset == "v1.5" else 1)
    response, history = model.chat(tok, pv, "Describe the image.", dict(max_new_tokens=6, do_sample=False),
                                   return_history=True)
    assert isinstance(response, str) and history[-1][1] == response
    # generate() directly: exactly max_new_tokens new ids unless a stop token came first
    out = model.generate(pixel_values=pv, input_ids=_prompt_ids(model, tok, pv.shape[0]),
                         max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert out.shape == (1, 6)


def _prompt_ids(model, tok, tiles):
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = "<img>" + IMG_CONTEXT_TOKEN * model.num_image_token * tiles + "</img>\nWhat is this?"
    return tok(text, return_tensors="pt")["input_ids"]


def test_image_tokens_are_spliced_into_the_llm_input(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.5"])
    tok = AutoTokenizer.from_pretrained(folders["v1.5"])
    pv = torch.randn(2, 3, 56, 56)
    ids = _prompt_ids(model, tok, 2)
    with torch.no_grad():
        logits = model(pixel_values=pv, input_ids=ids).logits
        # by hand: embeddings with the projector output at the IMG_CONTEXT positions
        emb = model.language_model.get_input_embeddings()(ids).clone()
        pos = ids[0] == model.img_context_token_id
        assert int(pos.sum()) == 2 * model.num_image_token
        emb[0, pos] = model.extract_feature(pv).reshape(-1, emb.shape[-1])
        ref = model.language_model(inputs_embeds=emb).logits
        assert torch.equal(logits, ref)
        # and the image really changes the output
        other = model(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids).logits
        assert not torch.allclose(other[0, -1], logits[0, -1])


def test_greedy_generate_follows_forward_argmax(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.2"])
    tok = AutoTokenizer.from_pretrained(folders["v1.2"])
    pv = torch.randn(1, 3, 56, 56)
    ids = _prompt_ids(model, tok, 1)
    gen = model.generate(pixel_values=pv, input_ids=ids, max_new_tokens=4, do_sample=False, eos_token_id=None,
                         pad_token_id=tok.pad_token_id)
    seq = ids
    with torch.no_grad():
        for i in range(4):
            nxt = model(pixel_values=pv, input_ids=seq).logits[0, -1].argmax()
            assert int(nxt) == int(gen[0, i])
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)


def test_token_count_mismatch_is_an_error(folders):
    model = InternVLChatModel.from_pretrained(folders["v1.1"])
    tok = AutoTokenizer.from_pretrained(folders["v1.1"])
    ids = _prompt_ids(model, tok, 1)
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        model(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids)
