"""Checks that run before any work: flags and paths before the model is even imported or loaded, then — on the
loaded model — the ``--skip`` patterns, the storability of every Linear at the chosen format / group size, and the
finiteness of every weight. Each failure is a :class:`QuantizeError` naming the flag, path, pattern or tensor.

Nothing here imports torch at module level (the CLI runs the flag checks before the ~10 s torch import).
"""
from __future__ import annotations

import fnmatch
import os

from .errors import QuantizeError

__all__ = ["check_flags", "check_out_vs_model", "check_skip_patterns", "check_storable", "check_finite_weights",
           "check_scale_range"]

FP16_MAX = 65504.0


def check_flags(*, nsamples: int | None, seqlen: int | None, calib_text: str | None, calib_images: str | None,
                parts=None) -> None:
    """Flag values and input paths that can be judged without the model."""
    if nsamples is not None and nsamples < 1:
        raise QuantizeError(f"--nsamples must be >= 1, got {nsamples}")
    if seqlen is not None and seqlen < 8:
        raise QuantizeError(f"--seqlen must be >= 8, got {seqlen}")
    if calib_text is not None:
        if not os.path.isfile(calib_text):
            raise QuantizeError(f"--calib-text: file not found: {calib_text}")
        if not os.access(calib_text, os.R_OK):
            raise QuantizeError(f"--calib-text: {calib_text} is not readable")
    if calib_images is not None and not os.path.isdir(calib_images):
        raise QuantizeError(f"--calib-images: {calib_images} is not a directory")
    if parts is not None:
        bad = [p for p in parts if p not in ("vision", "llm")]
        if bad:
            raise QuantizeError(f"--parts: unknown part(s) {bad}; choose from vision, llm")


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_out_vs_model(out: str | None, model: str | None) -> None:
    """``--out`` may not be ``--model``, lie inside it, or contain it: the commit step replaces ``--out`` as a whole
    (with ``--overwrite``), which would delete or corrupt the source checkpoint."""
    if not out or not model:
        return
    if _inside(out, model):
        what = "is" if os.path.realpath(out) == os.path.realpath(model) else "is inside"
        raise QuantizeError(f"--out {out} {what} --model {model}: write the quantized checkpoint elsewhere "
                            "(--overwrite never replaces the source checkpoint)")
    if _inside(model, out):
        raise QuantizeError(f"--out {out} contains --model {model}: replacing it would delete the source checkpoint")


def check_skip_patterns(patterns, names) -> None:
    """Every ``--skip`` pattern matches at least one Linear name (in-memory or official checkpoint name)."""
    names = list(names)
    dead = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if dead:
        example = names[0] if names else "(none)"
        raise QuantizeError(f"--skip: pattern(s) {dead} match no Linear of this model (names look like "
                            f"{example!r}; patterns are shell globs over full dotted names)")


def check_storable(linears: dict, st, skipped) -> dict:
    """``{name: reason}`` of the Linears that cannot be stored at ``st``'s format / bits / group size; a
    :class:`QuantizeError` when that leaves nothing to quantize (checked before calibration)."""
    from . import formats

    why = {}
    for name, lin in linears.items():
        if name in skipped:
            continue
        if st.fmt == "awq":
            r = formats.check_awq_shape(lin.in_features, lin.out_features, st.group_size, st.bits)
        else:
            r = formats.check_gptq_shape(lin.in_features, lin.out_features, st.bits, strict=True)
        if r:
            why[name] = r
    todo = [n for n in linears if n not in skipped]
    if not todo:
        raise QuantizeError("nothing to quantize: --skip matches every Linear of the selected --parts")
    if len(why) == len(todo):
        reasons = "; ".join(sorted(set(why.values()))[:3])
        raise QuantizeError(f"nothing is storable as --format {st.fmt} --bits {st.bits} --group-size "
                            f"{st.group_size}: {len(why)} of {len(todo)} Linears cannot be stored ({reasons}); "
                            "choose another group size or format")
    return why


def check_finite_weights(model) -> None:
    """Every floating parameter / buffer of ``model`` is finite, else :class:`QuantizeError` naming the tensors.

    Runs before any calibration: a NaN / Inf weight otherwise fails deep inside GPTQ / AWQ with a message that names
    no layer, or (RTN + Inf) writes a folder with a zeroed group.
    """
    import torch

    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and t.device.type != "meta":
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                kinds = "/".join(k for k, f in (("NaN", torch.isnan), ("Inf", torch.isinf)) if bool(f(t).any()))
                bad.append(f"{name} ({int((~finite).sum())} {kinds})")
    if bad:
        raise QuantizeError(f"--model: non-finite weights (NaN/Inf) in {len(bad)} tensor(s): "
                            + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))


def check_scale_range(linears: dict, st, skipped) -> None:
    """Scales are stored in fp16: a Linear whose weights span more than ``65504 * (2**bits - 1)`` cannot be stored
    (its scale would overflow to Inf). Named before any work instead of failing at pack time."""
    limit = FP16_MAX * (2 ** st.bits - 1)
    bad = []
    for name, lin in linears.items():
        if name in skipped or lin.weight.device.type == "meta":
            continue
        w = lin.weight.detach()
        span = float(w.max()) - float(w.min()) if st.group_size == -1 or not st.sym else 2 * float(w.abs().max())
        if span > limit:
            bad.append(f"{name} (weights span {span:.6g})")
    if bad:
        raise QuantizeError(f"weights too large for fp16 scales at --bits {st.bits} (span > {limit:.6g}): "
                            + ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") +
                            "; keep them 16-bit with --skip")
