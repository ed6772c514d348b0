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

from internvl_kernels.quant import formats
from .engine import PipelineResult, QuantSettings
from .parts import PartContext, parts_of
from . import preflight
from .errors import QuantizeError
from .writer import official_linear_name

__all__ = ["RunConfig", "LoadedModel", "load_model", "run", "QuantizeError"]


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
    target: str = "any"  # --target: which consumers must load the written folder (quantize.targets)


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
    from internvl_kernels.checkpoint import CheckpointError, UnsupportedConfigError
    from internvl_kernels.model.detect import detect_checkpoint

    if not os.path.isdir(path):
        raise QuantizeError(f"--model: folder not found: {path}")
    try:
        kind, raw = detect_checkpoint(path)
        if raw.get("quantization_config"):
            raise QuantizeError(f"--model: {path} is already quantized "
                                f"({raw['quantization_config'].get('quant_method')}); give a 16/32-bit checkpoint")
        if kind == "internvl_chat":
            from internvl_kernels.model import InternVLChatModel

            model = InternVLChatModel.from_pretrained(path, dtype=dtype)
            tok = _load_tokenizer(path, required=True)
            return LoadedModel(kind, model, raw, tok, path, f"InternVL-Chat checkpoint {path}")
        if kind == "intern_vit":
            from internvl_kernels.model import InternVisionModel

            model = InternVisionModel.from_pretrained(path, dtype=dtype)
            return LoadedModel(kind, model, raw, None, path, f"standalone InternViT checkpoint {path}")
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        except (OSError, ValueError, RuntimeError) as e:
            raise QuantizeError(f"--model: cannot load {path}: {e}") from e
        model.eval()
        tok = _load_tokenizer(path, required=True)
        return LoadedModel(kind, model, raw, tok, path, f"transformers LLM checkpoint {path}")
    except (CheckpointError, UnsupportedConfigError, FileNotFoundError) as e:
        raise QuantizeError(f"--model: {e}") from e


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


# Linears a consumer loads as one fused module (vLLM: QKVParallelLinear / MergedColumnParallelLinear — "some but not
# all shards" is refused; InternLM2 stores q/k/v as one wqkv): --skip of any member keeps the whole group 16-bit.
# Phi-3 stores them packed already.
_FUSED_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
INTERNLM2_PACKED = _FUSED_GROUPS[0]


def _is_internlm2(lm: LoadedModel) -> bool:
    return lm.kind == "internvl_chat" and lm.model.config.llm_architecture == "InternLM2ForCausalLM"


def _expand_skips(lm: LoadedModel, st: QuantSettings, linears) -> tuple:
    """``--skip`` patterns match in-memory or official checkpoint names (InternLM2: ``attention.wqkv``,
    ``feed_forward.w1``, ...); the Linears matched through an official name, and every fused-group partner (q/k/v,
    gate/up) of a skipped Linear, are added by name."""
    if not st.skip:
        return tuple(st.skip)
    hit = lambda n: any(fnmatch.fnmatchcase(n, p) for p in st.skip)  # noqa: E731
    skipped = {n for n in linears if hit(n) or hit(official_linear_name(lm.kind, n, lm.model))}
    for n in list(skipped):
        for group in _FUSED_GROUPS:
            for member in group:
                if n.endswith("." + member):
                    base = n[: -len(member)]
                    skipped.update(base + m for m in group if base + m in linears)
    return tuple(st.skip) + tuple(n for n in linears if n in skipped and not hit(n))


def validate(rc: RunConfig, lm: LoadedModel) -> list[str]:
    st = rc.settings
    available = {"internvl_chat": ("vision", "llm"), "intern_vit": ("vision",), "llm": ("llm",)}[lm.kind]
    bad = [p for p in rc.parts if p not in ("vision", "llm")]
    if bad:
        raise QuantizeError(f"--parts: unknown part(s) {bad}; choose from vision, llm")
    parts = [p for p in rc.parts if p in available]
    if not parts:
        raise QuantizeError(f"--parts {','.join(rc.parts)}: this {lm.kind} checkpoint has only {', '.join(available)}")
    fmt = formats.get_format(st.fmt)
    why = fmt.bits_reason(st.bits)
    if why:
        raise QuantizeError(f"--format {st.fmt} --bits {st.bits}: {why}; use --format gptq_v2")
    if not fmt.has_g_idx and st.act_order and not st.static_groups:
        raise QuantizeError("--act-order with --format awq: AWQ GEMM has no g_idx; use --format gptq/gptq_v2 "
                            "(or add --static-groups)")
    preflight.check_flags(nsamples=rc.nsamples, seqlen=rc.seqlen, calib_text=rc.calib_text,
                          calib_images=rc.calib_images if "vision" in parts or lm.kind == "internvl_chat" else None)
    preflight.check_out_vs_model(rc.out if rc.write else None, lm.src_dir)
    everything = planned_linears(lm, available)
    preflight.check_skip_patterns(st.skip, list(everything) +
                                  [official_linear_name(lm.kind, n, lm.model) for n in everything])
    st.skip = _expand_skips(lm, st, everything)
    plan = planned_linears(lm, parts)
    skipped = {n for n in plan if any(fnmatch.fnmatchcase(n, p) for p in st.skip)}
    preflight.check_storable(plan, st, skipped)
    preflight.check_finite_weights(lm.model)
    preflight.check_scale_range(plan, st, skipped)
    return parts


def planned_linears(lm: LoadedModel, parts) -> dict:
    """``{full in-memory name: nn.Linear}`` of every Linear the pipeline would quantize for ``parts``."""
    from .blocks import adapter_for

    model, stacks = lm.model, []
    if "vision" in parts and lm.kind in ("internvl_chat", "intern_vit"):
        vit = model.vision_model if lm.kind == "internvl_chat" else model
        stacks.append((vit.encoder.layers, "vision_model.encoder.layers" if lm.kind == "internvl_chat"
                       else "encoder.layers"))
    if "llm" in parts and lm.kind in ("internvl_chat", "llm"):
        causal = model.language_model if lm.kind == "internvl_chat" else model
        stacks.append((causal.model.layers, "language_model.model.layers" if lm.kind == "internvl_chat"
                       else "model.layers"))
    out = {}
    for blocks, prefix in stacks:
        for i, blk in enumerate(blocks):
            try:
                ad = adapter_for(blk)
            except ValueError as e:
                raise QuantizeError(f"{prefix}.{i}: {e}") from e
            for n, lin in ad.linears().items():
                out[f"{prefix}.{i}.{n}"] = lin
    return out


def run(rc: RunConfig, lm: LoadedModel, log=print) -> dict:
    """Quantize ``lm`` per ``rc``; write the checkpoint (if ``rc.out``) and return the report dict."""
    st = rc.settings
    parts = validate(rc, lm)  # every check that needs no calibration, before any work
    if _is_internlm2(lm):  # q/k/v are written as one packed wqkv: one act-order column order for the three
        st.packed_linears = INTERNLM2_PACKED
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
        ctx = PartContext(rc=rc, st=st, res=res, report=report, device=dev)
        model_parts = parts_of(lm, rc)
        for part in model_parts:  # every part prepares its calibration data (the LLM may use the vision part's)
            part.prepare(ctx, quantize=part.name in parts)
        for part in model_parts:
            if part.name in parts:
                t0 = time.perf_counter()
                part.quantize(ctx)
                report["metrics"][f"{part.name}_seconds"] = round(time.perf_counter() - t0, 2)
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

            try:
                write_checkpoint(tmp, lm.kind, model, _raw_config(lm), res.results, qconfig, lm.src_dir,
                                 lm.tokenizer if lm.src_dir is None else None, rc.max_shard_size,
                                 qconfig_in_llm_config=rc.target in ("lmdeploy", "any"))
            except Exception as e:  # disk full / quota / I/O error (safetensors raises its own SafetensorError)
                err = _write_error(e, rc.out)
                if err is e:
                    raise
                raise err from e
            report["metrics"]["seconds_write"] = round(time.perf_counter() - t0, 2)
            _check_written(tmp, rc.target, report)
            report["metrics"]["seconds_total"] = round(time.perf_counter() - t_start, 2)
            report["out"] = os.path.abspath(rc.out)
            # every file of the folder (the tokenizer's and config files included), the report itself too
            report["files"] = sorted(set(os.listdir(tmp)) | {"quant_report.json"})
            try:
                with open(os.path.join(tmp, "quant_report.json"), "w", encoding="utf-8") as f:
                    json.dump(_jsonable(report), f, indent=2)
                commit_out(tmp, rc.out)
            except OSError as e:
                raise _write_error(e, rc.out) from e  # always a QuantizeError for an OSError
            tmp = None
        else:
            report["metrics"]["seconds_total"] = round(time.perf_counter() - t_start, 2)
        return _jsonable(report)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _write_error(e: Exception, out: str) -> Exception:
    """An I/O failure while writing ``--out`` → :class:`QuantizeError` (one line, the temporary folder is removed by
    the caller); anything else is re-raised as it is (a bug, with its traceback)."""
    import errno

    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover
        SafetensorError = OSError
    if isinstance(e, OSError):
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    elif isinstance(e, SafetensorError):
        why = str(e)
    else:
        return e
    return QuantizeError(f"--out: writing {os.path.abspath(out)} failed ({why}); nothing was written")


def _check_written(folder: str, target: str, report: dict) -> None:
    """Run the consumer checker on what was just written; a folder its target does not load is not committed."""
    from internvl_kernels.quant.checker import check_folder

    chk = check_folder(folder, target)
    report["consumers"] = {k: {"verdict": v["verdict"], "reasons": [r["detail"] for r in v["reasons"]]}
                           for k, v in chk["verdicts"].items()}
    report["target"] = chk["target"]
    if not chk["target"]["ok"]:
        raise QuantizeError(f"--target {target}: the written folder does not pass its own check (nothing was "
                            "written):\n  " + "\n  ".join(chk["target"]["errors"]))


def _raw_config(lm: LoadedModel) -> dict:
    if lm.kind == "internvl_chat":
        cfg = lm.model.config.to_dict() if lm.src_dir is None else dict(lm.raw_config)
    else:
        cfg = dict(lm.raw_config)
    cfg.pop("quantization_config", None)
    return cfg


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
               "quantizer_options": {"mse": st.mse, "sink_weight": st.sink_weight, "group_order": st.group_order,
                                     "seed": st.seed}})


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
