"""Read a quantized folder (ours or anyone's: AutoGPTQ, GPTQModel, AutoAWQ, lmdeploy) and say, per consumer, whether
it loads, refuses or loads wrong — from the config files and the safetensors headers (plus one ``qzeros`` tensor),
without building a model. The rules live in :mod:`internvl_kernels.quant.consumers`.

``python -m quantize check <folder> [--target ...]`` prints :func:`format_check` of :func:`check_folder`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import struct

from ..checkpoint.config import read_config
from ..checkpoint.files import CheckpointError
from .consumers import CONSUMERS, Layout, mixed_fused, required_consumers, target_problems, verdicts

__all__ = ["CheckError", "inspect_folder", "check_folder", "format_check"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
_VISION_PREFIXES = ("vision_model.", "vision_tower.", "visual.")


class CheckError(ValueError):
    """The folder cannot be inspected at all (no folder, no config.json, not JSON)."""


def _read_header(path: str) -> dict:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 ** 2:
            raise ValueError(f"header length {n} is implausible")
        data = f.read(n)
        if len(data) != n:
            raise ValueError("truncated header")
    h = json.loads(data)
    h.pop("__metadata__", None)
    return h


def _weights(folder: str, problems: list) -> dict:
    """``{tensor name: (dtype, shape, file)}`` over the folder's safetensors (index honoured)."""
    idx = os.path.join(folder, "model.safetensors.index.json")
    files: list[str]
    if os.path.isfile(idx):
        with open(idx, encoding="utf-8") as f:
            wm = json.load(f).get("weight_map", {})
        files = sorted(set(wm.values()))
    else:
        files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        problems.append("no .safetensors weights in the folder")
    out = {}
    for name in files:
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            problems.append(f"missing shard {name} (named by model.safetensors.index.json)")
            continue
        try:
            for k, v in _read_header(p).items():
                out[k] = (v.get("dtype"), tuple(v.get("shape", ())), p)
        except (OSError, ValueError) as e:
            problems.append(f"unreadable shard {name}: {e}")
    return out


def _stored_zeros(tensors: dict, bits: int) -> str | None:
    """For a symmetric GPTQ folder: is the stored zero 2**(bits-1) - 1 (v1) or 2**(bits-1) (v2)? (one qzeros read)"""
    if bits not in (2, 4, 8):
        return None
    name = next((k for k in sorted(tensors) if k.endswith(".qzeros")), None)
    if name is None:
        return None
    try:
        from safetensors import safe_open

        with safe_open(tensors[name][2], framework="pt") as f:
            z = f.get_tensor(name)
    except Exception:  # noqa: BLE001 - an unreadable tensor is reported by the loaders, not here
        return None
    import torch

    u = z.to(torch.int64) & 0xFFFFFFFF
    vals = torch.stack([(u >> s) & ((1 << bits) - 1) for s in range(0, 32, bits)]).unique().tolist()
    if vals == [(1 << (bits - 1)) - 1]:
        return "v1"
    if vals == [1 << (bits - 1)]:
        return "v2"
    return None


def _norm_qcfg(q: dict | None) -> dict:
    q = dict(q or {})
    if "quant_method" not in q and ("bits" in q or "w_bit" in q):
        q["quant_method"] = "awq" if "w_bit" in q or "version" in q else "gptq"
    return q


def _not_converted(name: str, patterns) -> bool:
    for p in patterns or ():
        if name == p or name.startswith(p + ".") or fnmatch.fnmatchcase(name, p) or \
                re.search(rf"(^|\.){re.escape(p)}(\.|$)", name):
            return True
    return False


def _by_gptqmodel(q: dict) -> bool:
    """GPTQModel records ``meta.quantizer: ["gptqmodel:X.Y.Z"]``; it loads its own asymmetric v1 folders (>= 0.9)."""
    tools = (q.get("meta") or {}).get("quantizer") or []
    for t in tools if isinstance(tools, list) else [tools]:
        m = re.match(r"gptqmodel:(\d+)\.(\d+)", str(t))
        if m and (int(m.group(1)), int(m.group(2))) >= (0, 9):
            return True
    return False


def inspect_folder(folder: str) -> Layout:
    """The :class:`~internvl_kernels.quant.consumers.Layout` facts of a quantized folder."""
    if not os.path.isdir(folder):
        raise CheckError(f"folder not found: {folder}")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise CheckError(f"{folder} has no config.json (not a checkpoint folder)")
    try:  # the one config reader (named errors for unreadable / non-JSON / non-object files)
        cfg = read_config(folder)
        qjson = read_config(folder, "quantize_config.json") \
            if os.path.isfile(os.path.join(folder, "quantize_config.json")) else None
    except CheckpointError as e:
        raise CheckError(str(e)) from e
    llm_cfg = cfg.get("llm_config") if isinstance(cfg.get("llm_config"), dict) else None
    top = cfg.get("quantization_config")
    in_llm = (llm_cfg or {}).get("quantization_config")
    q = _norm_qcfg(top or in_llm or qjson)
    archs = cfg.get("architectures") or []
    if "vision_config" in cfg and llm_cfg is not None:
        kind = "internvl_chat"
        llm_arch = (llm_cfg.get("architectures") or [None])[0]
    elif "InternVisionModel" in archs or cfg.get("model_type") in ("intern_vit_6b", "intern_vit"):
        kind, llm_arch = "intern_vit", None
    else:
        kind, llm_arch = "llm", (archs or [None])[0]
    problems: list = []
    tensors = _weights(folder, problems)
    quantized = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    qset = set(quantized)
    dense = sorted(k[: -len(".weight")] for k, (dt, shape, _) in tensors.items()
                   if k.endswith(".weight") and len(shape) == 2 and k[: -len(".weight")] not in qset)
    method = q.get("quant_method")
    if method is not None:
        method = str(method).lower()
    bits = q.get("bits", q.get("w_bit"))
    gs = q.get("group_size", q.get("q_group_size"))
    gs = -1 if gs in (None, 0) and method else gs
    fmt = q.get("checkpoint_format") or q.get("format") if method == "gptq" else None
    if method == "gptq" and fmt not in ("gptq", "gptq_v2"):
        fmt = "gptq"
    sym = q.get("sym")
    if method == "awq":
        sym = not q.get("zero_point", True)
    # input widths of the quantized Linears
    partial = []
    for n in quantized:
        dt, shape, _ = tensors[n + ".qweight"]
        if method == "awq":
            in_f = shape[0]
        elif (n + ".g_idx") in tensors:
            in_f = tensors[n + ".g_idx"][1][0]
        elif bits:
            in_f = shape[0] * 32 // int(bits)
        else:
            continue
        if gs not in (None, -1) and in_f % int(gs):
            partial.append(f"{n} ({in_f})")
    parts = {"vision": any(n.startswith(_VISION_PREFIXES) or (kind == "intern_vit") for n in quantized),
             "llm": any(not n.startswith(_VISION_PREFIXES) for n in quantized) and kind != "intern_vit"}
    not_convert = q.get("modules_to_not_convert")
    unconverted = [n for n in dense if not _not_converted(n, not_convert)
                   and not re.search(r"(embed|lm_head$|\.output$|^output$|patch_embedding)", n)]
    lay = Layout(kind=kind, llm_arch=llm_arch, ps_version=cfg.get("ps_version") if kind == "internvl_chat" else None,
                 method=method, checkpoint_format=fmt, awq_version=(str(q.get("version", "gemm")).lower()
                                                                   if method == "awq" else None),
                 bits=int(bits) if bits is not None else None, group_size=int(gs) if gs is not None else None,
                 sym=bool(sym) if sym is not None else None,
                 desc_act=bool(q.get("desc_act", False)) if method == "gptq" else None,
                 torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
                 config_top=bool(top), config_llm=bool(in_llm) if kind == "internvl_chat" else None,
                 config_json=qjson is not None, modules_to_not_convert=not_convert, quantized=quantized,
                 dense=dense, quantized_parts=parts, partial_groups=partial, fused_mixed=mixed_fused(quantized, dense),
                 stored_zero_layout=_stored_zeros(tensors, int(bits)) if method == "gptq" and sym and bits else None,
                 unconverted_dense=unconverted,
                 tokenizer=any(os.path.isfile(os.path.join(folder, n)) for n in _TOKENIZER_FILES),
                 made_by_gptqmodel=_by_gptqmodel(q),
                 problems=problems)
    if not quantized and method:
        lay.problems.append("config has quantization_config but no tensor has a .qweight")
    if not method:
        lay.problems.append("no quantization_config / quantize_config.json: not a quantized folder")
    return lay


def check_folder(folder: str, target: str | None = None) -> dict:
    """Per-consumer verdicts and layout facts of ``folder``; with ``target``, whether that target's consumers load it."""
    lay = inspect_folder(folder)
    v = verdicts(lay)
    rep = {"folder": os.path.abspath(folder), "layout": _facts(lay), "verdicts": v}
    if target is not None:
        errors, warnings = target_problems(lay, target)
        rep["target"] = {"name": target, "required": list(required_consumers(target, lay)), "ok": not errors,
                         "errors": errors, "warnings": warnings}
    return rep


def _facts(lay: Layout) -> dict:
    d = lay.to_dict()
    d["n_quantized"] = len(lay.quantized)
    d["n_dense_2d"] = len(lay.dense)
    return d


def format_check(rep: dict, max_modules: int = 6) -> str:
    L = rep["layout"]
    fmt = L["method"] if L["method"] != "gptq" else L["checkpoint_format"]
    q = L["quantized"]
    lines = [f"folder {rep['folder']}",
             f"  {L['kind']} ({L['llm_arch'] or '-'}"
             + (f", ps_version {L['ps_version']}" if L["ps_version"] else "") + f"), torch_dtype {L['torch_dtype']}",
             f"  format {fmt}  bits {L['bits']}  group {L['group_size']}  sym {L['sym']}  act-order {L['desc_act']}"
             + (f"  AWQ version {L['awq_version']}" if L["awq_version"] else ""),
             f"  quantized: {len(q)} Linears (vision {L['quantized_parts'].get('vision')}, llm "
             f"{L['quantized_parts'].get('llm')}), e.g. {', '.join(q[:max_modules])}"
             + (" ..." if len(q) > max_modules else ""),
             f"  quantization_config: config.json {L['config_top']}, llm_config {L['config_llm']}, "
             f"quantize_config.json {L['config_json']}"]
    if L["stored_zero_layout"]:
        lines.append(f"  stored symmetric zeros look like {L['stored_zero_layout']}")
    for p in L["problems"]:
        lines.append(f"  problem: {p}")
    lines.append("consumers:")
    for key, v in rep["verdicts"].items():
        lines.append(f"  {v['consumer']:26s} {v['verdict']}")
        for r in v["reasons"]:
            fix = f" → change: {r['fix']}" if r["fix"] else ""
            lines.append(f"      [{r['rule']}] {r['detail']}{fix}")
    t = rep.get("target")
    if t:
        req = ", ".join(CONSUMERS[c].name for c in t["required"]) or "none (warnings only)"
        lines.append(f"target {t['name']} (must load: {req}): {'OK' if t['ok'] else 'NOT MET'}")
        for e in t["errors"]:
            lines.append(f"  error: {e}")
    return "\n".join(lines)
