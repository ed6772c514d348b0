"""``--target vllm | lmdeploy | transformers | any``: the defaults each consumer needs, and refusing (before any
work) the flag combinations it cannot load. The rules themselves are the table in
:mod:`internvl_kernels.quant.consumers`; this module predicts the folder a run would write (a
:class:`~internvl_kernels.quant.consumers.Layout`) and asks the table.

Two steps, so that most refusals come before the checkpoint is even loaded:

* :func:`apply_defaults` (flags only) fills what the user did not give: vLLM → symmetric GPTQ (Marlin);
  lmdeploy → ``--parts llm``, symmetric, group 128, GPTQ v1 or AWQ; transformers → AWQ.
* :func:`check_model` (after loading, before calibration) picks the group size for vLLM (the largest of 128/64/32
  that divides every quantized width), sets fp16 for vLLM's plain (non-Marlin) kernels, and evaluates the rules on
  the predicted layout: errors raise, ``--target any`` warnings are returned.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from internvl_kernels.quant.consumers import Layout, mixed_fused, target_problems

__all__ = ["TARGET_CHOICES", "apply_defaults", "check_settings", "check_model", "predicted_layout"]

TARGET_CHOICES = ("vllm", "lmdeploy", "transformers", "any")


class TargetError(ValueError):
    """A flag combination the chosen ``--target`` cannot load (the CLI prints it, exit code 2)."""


def apply_defaults(args) -> list[str]:
    """Fill unset flags with the target's defaults (in place); returns notes on what was chosen."""
    t = args.target
    notes = []
    if t == "transformers" and args.method is None:
        args.method = "awq"
        notes.append("--method awq (transformers loads AWQ for InternVL; its GPTQ path refuses vision-language "
                     "models)")
    if args.method is None:
        args.method = "gptq"
    if args.fmt is None:
        args.fmt = "awq" if args.method == "awq" or (t == "transformers" and args.method == "rtn") else "gptq"
        if args.fmt == "awq" and args.bits != 4:  # AWQ GEMM stores 4-bit only; gptq_v2 stores any zero point
            args.fmt = "gptq_v2"
            notes.append(f"--format gptq_v2 (--bits {args.bits}: the AWQ GEMM format is 4-bit only; gptq_v2 loads in "
                         "GPTQModel, vLLM's gptq readers and this project's runtime)")
    if t == "lmdeploy" and args.parts is None:
        args.parts = "llm"
        notes.append("--parts llm (lmdeploy never quantizes the vision tower)")
    if args.sym is None:
        args.sym = t in ("vllm", "lmdeploy") and args.fmt != "awq"
        if args.sym:
            notes.append("--sym (" + ("GPTQ Marlin needs symmetric" if t == "vllm" else
                                      "TurboMind's GPTQ is symmetric") + ")")
    if t == "lmdeploy" and args.group_size is None:
        args.group_size = 128
    return notes


def _layout_from_settings(target, st, parts, kind, dtype_name=None) -> Layout:
    return Layout(kind=kind, method="awq" if st.fmt == "awq" else "gptq",
                  checkpoint_format=None if st.fmt == "awq" else st.fmt, awq_version="gemm" if st.fmt == "awq" else None,
                  bits=st.bits, group_size=st.group_size, sym=st.sym, desc_act=st.act_order if st.fmt != "awq" else None,
                  torch_dtype=dtype_name, config_top=True,
                  config_llm=(target in ("lmdeploy", "any")) if kind in (None, "internvl_chat") else None,
                  config_json=True, quantized_parts={"vision": "vision" in parts, "llm": "llm" in parts},
                  tokenizer=True, unconverted_dense=[])


def check_settings(target: str, st, parts, dtype_name=None) -> list[str]:
    """Flag-only check (before loading): raises :class:`TargetError` on what the target can never load."""
    if st.method == "smoothquant":  # W8A8 compressed-tensors (vision only): no GPTQ / AWQ consumer rules apply
        return []
    lay = _layout_from_settings(target, st, parts, None, dtype_name)
    return _raise_or_warn(target, lay)


def _raise_or_warn(target, lay) -> list[str]:
    errors, warnings = target_problems(lay, target)
    if errors:
        raise TargetError(f"--target {target}: this combination does not load as asked:\n  " + "\n  ".join(errors)
                          + ("\n  (--target any writes it anyway and warns, except what would load silently wrong)"
                             if target != "any" else ""))
    return warnings


def _stacks(lm, parts):
    m = lm.model
    if lm.kind == "internvl_chat":
        if "vision" in parts:
            yield "vision_model.encoder.layers", m.vision_model.encoder.layers
        if "llm" in parts:
            yield "language_model.model.layers", m.language_model.model.layers
    elif lm.kind == "intern_vit" and "vision" in parts:
        yield "encoder.layers", m.encoder.layers
    elif lm.kind == "llm" and "llm" in parts:
        yield "model.layers", m.model.layers


def _linears(lm, parts):
    for prefix, layers in _stacks(lm, parts):
        for i, blk in enumerate(layers):
            for name, mod in blk.named_modules():
                if isinstance(mod, nn.Linear):
                    yield f"{prefix}.{i}.{name}", mod


def _storable(lin, st) -> bool:
    from . import formats

    if st.fmt == "awq":
        return formats.check_awq_shape(lin.in_features, lin.out_features, st.group_size, st.bits) is None
    return formats.check_gptq_shape(lin.in_features, lin.out_features, st.bits, strict=True) is None


def predicted_layout(target, lm, st, parts, dtype_name) -> Layout:
    quantized, dense, partial = [], [], []
    for name, lin in _linears(lm, parts):
        if any(fnmatch.fnmatchcase(name, p) for p in st.skip) or not _storable(lin, st):
            dense.append(name)
            continue
        quantized.append(name)
        gs = st.group_size
        if gs not in (None, -1) and lin.in_features % gs:
            partial.append(f"{name} ({lin.in_features})")
    lay = _layout_from_settings(target, st, parts, lm.kind, dtype_name)
    cfg = getattr(lm.model, "config", None)
    if lm.kind == "internvl_chat":
        lay.ps_version = getattr(cfg, "ps_version", None)
        lay.llm_arch = getattr(cfg, "llm_architecture", None)
    lay.quantized, lay.dense, lay.partial_groups = quantized, dense, partial
    lay.fused_mixed = mixed_fused(quantized, dense)
    lay.quantized_parts = {"vision": any(n.startswith(("vision_model.", "encoder.")) for n in quantized),
                           "llm": any(n.startswith(("language_model.", "model.")) for n in quantized)}
    return lay


def _widths(lm, st, parts) -> set:
    return {lin.in_features for name, lin in _linears(lm, parts)
            if not any(fnmatch.fnmatchcase(name, p) for p in st.skip)}


def _divides_all(lm, st, parts, g) -> bool:
    return g in (None, -1) or all(w % g == 0 for w in _widths(lm, st, parts))


def pick_group_size(lm, st, parts, candidates=(128, 64, 32)) -> int:
    """The largest candidate group dividing the input width of every Linear that would be quantized."""
    widths = _widths(lm, st, parts)
    for g in candidates:
        if all(w % g == 0 for w in widths):
            return g
    return candidates[0]


def needs_fp16(target, st) -> bool:
    """vLLM runs this layout on its plain GPTQ/AWQ kernel (not Marlin), which takes float16 activations only."""
    from internvl_kernels.quant.consumers import _marlin_ok

    if st.method == "smoothquant":
        return False
    return target == "vllm" and not _marlin_ok(_layout_from_settings(target, st, ("llm",), None))


def check_model(target, lm, st, parts, dtype_name, group_given: bool, dtype_given: bool) -> tuple[list, list]:
    """After loading, before calibration: fix what the target decides, then refuse or warn. Mutates ``st``.

    Returns ``(notes, warnings)``; ``st.group_size`` and the returned dtype note may change.
    """
    notes = []
    if target == "vllm" and not group_given and not _divides_all(lm, st, parts, st.group_size):
        g = pick_group_size(lm, st, parts)
        if g != st.group_size:
            notes.append(f"--group-size {g} (vLLM needs a group dividing every input width; {st.group_size} does not)")
            st.group_size = g
    lay = predicted_layout(target, lm, st, parts, dtype_name)
    try:
        return notes, _raise_or_warn(target, lay)
    except TargetError as e:
        if lay.partial_groups and "not aligned" in str(e):
            g = pick_group_size(lm, st, parts)
            if _divides_all(lm, st, parts, g):
                raise TargetError(f"{e}\n  (--group-size {g} divides every quantized width of this model)") from None
        raise
