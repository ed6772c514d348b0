"""SmoothQuant W8A8 for InternViT: ``python -m quantize --method smoothquant`` → a compressed-tensors folder.

Per block, true-sequentially (each block calibrated on the outputs of the already-quantized blocks):

1. **capture** on the calibration photos: per-channel ``max|x|`` of the inputs of ``qkv`` (= ``norm1`` output),
   ``proj`` (the attention output = the v path), ``fc1`` (``norm2`` output), plus a token sample of the block
   input and the float block's output on it;
2. **migration** ``s_j = max|x_j|^α / max|W_{:,j}|^(1-α)`` for the three groups whose scale folds *exactly* into a
   linear op (the same groups as AWQ, :class:`quantize.blocks.VitBlock`): ``norm1 → qkv`` (norm weight [and bias]
   ÷ s, qkv columns × s), ``v rows of qkv → proj`` (attention is linear in v), ``norm2 → fc1``. Nothing goes
   through GELU: ``fc2``'s input keeps its outliers and relies on per-token scales;
3. **α search** per block: every α of the grid (and "no migration") is applied to a copy of the block, its four
   Linears become :class:`~internvl_kernels.quant.w8a8.W8A8Linear` (per-output-channel symmetric int8 / fp8
   weights, per-token dynamic or static per-tensor activations), and the block output MSE on the token sample is
   measured; the best α is kept;
4. the quantized block replaces the float one; the calibration stream and the held-out streams (float, SmoothQuant,
   plain per-token W8A8 without migration = RTN W8A8) advance; per-block held-out feature SQNR is recorded.

Static activation scales (``act_scales="static"``): per-tensor ``max|x| / qmax`` of each Linear's input over the
calibration photos, measured on the migrated block. The report puts the held-out feature SQNR beside RTN W8A8 and
W4A16 GPTQ (g128, the project's GPTQ) on the same tower.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .blocks import VitBlock, fold_scale
from .metrics import sqnr_db
from .streams import Stream, vision_stream

__all__ = ["SmoothQuantSettings", "smooth_block", "smoothquant_vit", "run_smoothquant", "LINEARS"]

LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
DEFAULT_ALPHAS = tuple(round(0.1 * i, 2) for i in range(0, 11))


@dataclass
class SmoothQuantSettings:
    quant_dtype: str = "int8"  # int8 | fp8
    act_scales: str = "dynamic"  # dynamic (per token) | static (per tensor, calibrated)
    alphas: tuple = DEFAULT_ALPHAS
    search_tokens: int = 4096  # block-input tokens the α search runs on
    device: str = "cpu"
    compare_gptq: bool = True  # report W4A16 GPTQ on the same tower
    progress: bool = True


@dataclass
class SmoothQuantResult:
    blocks: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def _w8a8(lin: nn.Linear, st: SmoothQuantSettings, amax: float | None = None):
    from internvl_kernels.model.functional import quant_max
    from internvl_kernels.quant.w8a8 import W8A8Linear

    scale = None
    if st.act_scales == "static":
        scale = max(float(amax), 1e-12) / quant_max(st.quant_dtype)
    return W8A8Linear.from_linear(lin, st.quant_dtype, input_scale=scale)


def _set(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent), child, module)


def _capture(block: nn.Module, stream: Stream, names=LINEARS):
    """Per-channel and per-tensor max|x| of the inputs of ``names`` over ``stream``."""
    ch = {n: None for n in names}
    hooks = []
    for n in names:
        def hook(mod, args, n=n):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).to(torch.float32)
            ch[n] = a if ch[n] is None else torch.maximum(ch[n], a)
        hooks.append(block.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for x, _ in stream:
                block(x)
    finally:
        for h in hooks:
            h.remove()
    return ch


def _migrate(block: nn.Module, act_amax: dict, alpha: float | None) -> dict:
    """Fold the SmoothQuant scales for ``alpha`` into ``block`` (in place); returns ``{group: s}``.
    ``alpha=None``: no migration."""
    if alpha is None:
        return {}
    ad = VitBlock(block)
    linears = ad.linears()
    inputs = {"norm1->qkv": "attn.qkv", "v->proj": "attn.proj", "norm2->fc1": "mlp.fc1"}
    out = {}
    for g in ad.scale_groups():
        xa = act_amax[inputs[g.name]].to(torch.float64)
        wa = torch.stack([linears[n].weight.detach().abs().to(torch.float64).amax(0) for n in g.linears]).amax(0)
        s = xa.clamp_min(1e-5).pow(alpha) / wa.clamp_min(1e-5).pow(1 - alpha)
        s = torch.where((xa > 0) & (wa > 0), s, torch.ones_like(s))
        s = (s / s.max().sqrt() / s.min().sqrt()).clamp(1e-4, 1e4)  # centred around 1 (any common factor is exact)
        fold_scale(g, linears, s.to(torch.float32))
        out[g.name] = s.to(torch.float32)
    return out


def _quantize_linears(block: nn.Module, st: SmoothQuantSettings, static_amax: dict | None = None) -> None:
    for n in LINEARS:
        _set(block, n, _w8a8(block.get_submodule(n), st, None if static_amax is None else static_amax[n]))


def _static_amax(block, stream):
    return {n: float(v.max()) for n, v in _capture(block, stream).items()}


def _forward(block, stream: Stream) -> Stream:
    from internvl_kernels import set_backend

    with torch.no_grad(), set_backend("eager"):
        return Stream((block(x), kw) for x, kw in stream)


def _sample(stream: Stream, n_tokens: int) -> Stream:
    out, got = Stream(), 0
    for x, kw in stream:
        if got >= n_tokens:
            break
        out.append((x, kw))
        got += x.shape[0] * x.shape[1]
    return out


def _variant(block, act_amax, alpha, st, calib):
    b = copy.deepcopy(block)
    scales = _migrate(b, act_amax, alpha)
    static = _static_amax(b, calib) if st.act_scales == "static" else None
    _quantize_linears(b, st, static)
    return b, scales


def smooth_block(block: nn.Module, calib: Stream, st: SmoothQuantSettings):
    """Search α on ``calib`` (block-input stream) and return ``(quantized block copy, rtn block copy, info)``."""
    act_amax = _capture(block, calib)
    sample = _sample(calib, st.search_tokens)
    ref = torch.cat([y.to(torch.float64).reshape(-1) for y, _ in _forward(block, sample)])
    errs = {}
    best, best_err = None, math.inf
    for alpha in (None,) + tuple(st.alphas):
        b, _ = _variant(block, act_amax, alpha, st, calib)
        out = torch.cat([y.to(torch.float64).reshape(-1) for y, _ in _forward(b, sample)])
        err = float((out - ref).pow(2).mean())
        errs["none" if alpha is None else f"{alpha:g}"] = err
        if err < best_err:
            best, best_err = alpha, err
    qb, scales = _variant(block, act_amax, best, st, calib)
    rtn, _ = _variant(block, act_amax, None, st, calib)
    info = {"alpha": best, "search_mse": errs, "search_tokens": sum(x.shape[0] * x.shape[1] for x, _ in sample),
            "act_amax_max": {n: float(v.max()) for n, v in act_amax.items()},
            "act_outlier_ratio": {n: float(v.max() / v.median().clamp_min(1e-12)) for n, v in act_amax.items()}}
    return qb, rtn, info


def smoothquant_vit(vit: nn.Module, calib_px, held_px, st: SmoothQuantSettings, feature_index: int | None = None,
                    prefix: str = "encoder.layers", log=print) -> SmoothQuantResult:
    """Quantize every block of ``vit`` (an InternVisionModel) in place; returns per-block and output metrics."""
    dev = torch.device(st.device)
    layers = vit.encoder.layers
    n = len(layers)
    feature_index = n if feature_index is None else feature_index
    calib = vision_stream(vit, calib_px, dev)
    held_f = vision_stream(vit, held_px, dev)
    held_q = Stream((x.clone(), kw) for x, kw in held_f)
    held_r = Stream((x.clone(), kw) for x, kw in held_f)
    res = SmoothQuantResult()
    feats = None
    for i in range(n):
        t0 = time.perf_counter()
        blk = layers[i]
        home = next(blk.parameters()).device
        blk.to(dev)
        qb, rb, info = smooth_block(blk, calib, st)
        calib = _forward(qb, calib)
        held_f = _forward(blk, held_f)
        held_q = _forward(qb, held_q)
        held_r = _forward(rb, held_r)
        layers[i] = qb.to(home)
        blk.to(home)
        row = {"block": f"{prefix}.{i}", "alpha": info["alpha"], "search_mse": info["search_mse"],
               "search_tokens": info["search_tokens"], "act_outlier_ratio": info["act_outlier_ratio"],
               "seconds": round(time.perf_counter() - t0, 2)}
        if held_f:
            f = torch.cat([x for x, _ in held_f])
            row["heldout_sqnr_db"] = sqnr_db(f, torch.cat([x for x, _ in held_q]))
            row["heldout_sqnr_db_rtn_w8a8"] = sqnr_db(f, torch.cat([x for x, _ in held_r]))
        res.blocks.append(row)
        if st.progress:
            log(f"  [smoothquant] block {i + 1}/{n}: alpha={info['alpha']} held-out SQNR "
                f"{row.get('heldout_sqnr_db', float('nan')):.2f} dB (RTN W8A8 "
                f"{row.get('heldout_sqnr_db_rtn_w8a8', float('nan')):.2f} dB) {row['seconds']} s")
        if i + 1 == feature_index and held_f:
            feats = (torch.cat([x for x, _ in held_f]), torch.cat([x for x, _ in held_q]),
                     torch.cat([x for x, _ in held_r]))
    if feats is not None:
        res.metrics["vit_feature_sqnr_db"] = sqnr_db(feats[0], feats[1])
        res.metrics["vit_feature_sqnr_db_rtn_w8a8"] = sqnr_db(feats[0], feats[2])
        res.metrics["_feats"] = feats
    return res


def _gptq_w4a16_sqnr(vit_float, calib_px, held_px, device, feature_index, group_size=128) -> float | None:
    from .engine import PipelineResult, QuantSettings, quantize_stack

    C = vit_float.config.hidden_size
    gs = group_size if C % group_size == 0 else -1
    st = QuantSettings(method="gptq", bits=4, group_size=gs, sym=True, fmt="gptq", device=str(device),
                       progress=False)
    vit = copy.deepcopy(vit_float)
    calib = vision_stream(vit, calib_px, device)
    held = vision_stream(vit, held_px, device)
    held_q = Stream((x.clone(), kw) for x, kw in held)
    _, _, _, snaps = quantize_stack(vit.encoder.layers, "encoder.layers", calib, st, PipelineResult(),
                                    (held, held_q), feature_index=feature_index, desc="gptq-w4a16")
    if not snaps:
        return None
    f, q = snaps["held"]
    return sqnr_db(torch.cat([x for x, _ in f]), torch.cat([x for x, _ in q]))


# ---------------------------------------------------------------------------------------------------- the run
def _ignore_list(kind: str) -> list[str]:
    if kind == "internvl_chat":  # vLLM never quantizes mlp1; the LLM stays 16-bit with --parts vision
        return ["re:^language_model\\..*", "re:^mlp1\\..*"]
    return []


def run_smoothquant(lm, st: SmoothQuantSettings, *, calib_images=None, max_calib_images=None, max_tiles=None,
                    eval_images=4, out=None, overwrite=False, max_shard_size=5 * 1024 ** 3, write=True,
                    log=print) -> dict:
    """Quantize the ViT of ``lm`` (:class:`quantize.runner.LoadedModel`) and write the compressed-tensors folder."""
    from internvl_kernels.checkpoint.files import save_state_dict
    from internvl_kernels.quant.w8a8 import compressed_tensors_config

    from .calib import calibration_images, heldout_images
    from .parts import image_cfg_of
    from .runner import QuantizeError, _jsonable, _raw_config, commit_out, prepare_out
    from .writer import copy_other_files

    if lm.kind not in ("internvl_chat", "intern_vit"):
        raise QuantizeError(f"--method smoothquant quantizes the vision tower; this {lm.kind} checkpoint has none")
    if st.quant_dtype not in ("int8", "fp8"):
        raise QuantizeError(f"--w8a8-dtype must be int8 or fp8, got {st.quant_dtype!r}")
    if st.act_scales not in ("dynamic", "static"):
        raise QuantizeError(f"--act-scales must be dynamic or static, got {st.act_scales!r}")
    model = lm.model
    vit = model.vision_model if lm.kind == "internvl_chat" else model
    img_cfg = image_cfg_of(lm, max_tiles)
    t_start = time.perf_counter()
    tmp = prepare_out(out, overwrite) if (out and write) else None
    try:
        calib_px = calibration_images(folder=calib_images, max_images=max_calib_images, **img_cfg)
        held_px = heldout_images(n=eval_images, **img_cfg) if eval_images else []
        n_layers = len(vit.encoder.layers)
        if lm.kind == "internvl_chat":
            sel = model.select_layer
            feat_idx = sel if sel >= 0 else n_layers + 1 + sel
        else:
            feat_idx = n_layers
        vit_float = copy.deepcopy(vit) if (st.compare_gptq and held_px) else None
        prefix = "vision_model.encoder.layers" if lm.kind == "internvl_chat" else "encoder.layers"
        res = smoothquant_vit(vit, calib_px, held_px, st, feat_idx, prefix, log)
        res.metrics.pop("_feats", None)
        report = {"model": lm.description, "kind": lm.kind, "parts": ["vision"], "method": "smoothquant",
                  "settings": {"quant_dtype": st.quant_dtype, "act_scales": st.act_scales, "alphas": list(st.alphas),
                               "search_tokens": st.search_tokens, "device": st.device},
                  "calibration": {"images": {"source": calib_images or "skimage.data photos",
                                             "images": len(calib_px), "tiles": int(sum(p.shape[0] for p in calib_px)),
                                             "heldout_images": len(held_px),
                                             "heldout_tiles": int(sum(p.shape[0] for p in held_px)), **img_cfg}},
                  "blocks": res.blocks, "metrics": dict(res.metrics)}
        report["metrics"]["vit_feature"] = f"hidden_states[{feat_idx}]"
        if vit_float is not None:
            report["metrics"]["vit_feature_sqnr_db_gptq_w4a16"] = _gptq_w4a16_sqnr(
                vit_float, calib_px, held_px, torch.device(st.device), feat_idx)
            del vit_float
        report["metrics"]["seconds_quantize"] = round(time.perf_counter() - t_start, 2)
        qcfg = compressed_tensors_config(st.quant_dtype, st.act_scales, _ignore_list(lm.kind), extra={
            "quantizer": {"method": "smoothquant", "alphas": {r["block"]: r["alpha"] for r in res.blocks}}})
        report["quantization_config"] = qcfg
        if tmp is not None:
            sd = dict(model.official_state_dict() if lm.kind == "internvl_chat" else model.state_dict())
            cfg = _raw_config(lm)
            cfg["quantization_config"] = qcfg
            dts = {str(t.dtype).replace("torch.", "") for k, t in sd.items() if t.is_floating_point()
                   and not k.endswith(("weight_scale", "input_scale")) and t.dtype != torch.float8_e4m3fn}
            if len(dts) == 1:
                cfg["torch_dtype"] = dts.pop()
            files = []
            if lm.src_dir is not None:
                files += copy_other_files(lm.src_dir, tmp)
            elif lm.tokenizer is not None:
                lm.tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(cfg, f, indent=2, ensure_ascii=False)
            files += save_state_dict({k: v.contiguous() for k, v in sd.items()}, tmp, max_shard_size=max_shard_size,
                                     metadata={"quantized_by": "internvl-kernels quantize (smoothquant)"})
            report["out"] = os.path.abspath(out)
            report["files"] = sorted(files)
            report["metrics"]["seconds_total"] = round(time.perf_counter() - t_start, 2)
            with open(os.path.join(tmp, "quant_report.json"), "w", encoding="utf-8") as f:
                json.dump(_jsonable(report), f, indent=2)
            commit_out(tmp, out)
            tmp = None
        return _jsonable(report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def format_smoothquant_report(r: dict) -> str:
    m = r["metrics"]
    lines = [f"SmoothQuant W8A8 ({r['settings']['quant_dtype']}, {r['settings']['act_scales']} activation scales) "
             f"— {r['model']}", "block                                alpha   held-out SQNR dB (SmoothQuant / RTN W8A8)"]
    for b in r["blocks"]:
        lines.append(f"  {b['block']:<36} {str(b['alpha']):<6}  {b.get('heldout_sqnr_db', float('nan')):7.2f} / "
                     f"{b.get('heldout_sqnr_db_rtn_w8a8', float('nan')):7.2f}")
    fmt = lambda v: "n/a" if v is None else f"{float(v):.2f} dB"  # noqa: E731
    lines.append(f"ViT feature {m.get('vit_feature')} on held-out photos: SmoothQuant W8A8 "
                 f"{fmt(m.get('vit_feature_sqnr_db'))}, RTN W8A8 {fmt(m.get('vit_feature_sqnr_db_rtn_w8a8'))}, "
                 f"GPTQ W4A16 {fmt(m.get('vit_feature_sqnr_db_gptq_w4a16'))}")
    if r.get("out"):
        lines.append(f"wrote {r['out']} (compressed-tensors {r['quantization_config']['format']})")
    return "\n".join(lines)
