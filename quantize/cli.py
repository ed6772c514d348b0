"""``python -m quantize``: GPTQ / AWQ / RTN for InternVL-Chat (ViT and LLM), standalone InternViT, or a Llama LLM.

Without ``--model`` it runs the self-contained demo (see :mod:`quantize.demo`).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from internvl_kernels.quant.formats import FORMATS
from .targets import TARGET_CHOICES

EPILOG = """\
examples:
  python -m quantize --bits 4                                   # the CPU demo (SmolLM2-135M + random InternViT)
  python -m quantize --model InternVL-Chat-V1-5 --bits 4 --group-size 128 --method gptq --act-order \\
      --device cuda --out InternVL-Chat-V1-5-W4g128
  python -m quantize --model InternVL-Chat-V1-2 --method awq --parts llm --format awq --out V1-2-AWQ
  python -m quantize --model InternVL-Chat-V1-5 --target lmdeploy --out V1-5-W4-lmdeploy
  python -m quantize check V1-5-W4-lmdeploy --target lmdeploy   # which runtimes load a quantized folder
exit codes: 0 success, 2 bad arguments / data / checkpoint (message on stderr), 1 unexpected error.
"""


def _size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*", s, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {s!r} (e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    mult = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}[unit]
    return int(float(m.group(1)) * mult)


def _group(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid group size {s!r}: an integer (e.g. 128) or -1")
    if v != -1 and v <= 0:
        raise argparse.ArgumentTypeError(f"invalid group size {v}: positive or -1 (one group per row)")
    return v


def _pos_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {s!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantize", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--model", metavar="PATH", help="InternVL-Chat folder, standalone InternViT folder, or a "
                   "transformers Llama-style LLM folder (omit to run the demo)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=4)
    p.add_argument("--group-size", type=_group, default=None,
                   help="input channels per scale/zero group, or -1 (default 128; demo 64)")
    p.add_argument("--method", choices=("gptq", "awq", "rtn", "smoothquant"), default=None,
                   help="algorithm (default gptq; awq for --target transformers). smoothquant: W8A8 (int8 / fp8 "
                        "weights AND activations) of the vision tower, written as a compressed-tensors folder "
                        "(vLLM's W8A8 format)")
    p.add_argument("--w8a8-dtype", choices=("int8", "fp8"), default="int8",
                   help="smoothquant: int8, or fp8 e4m3 (float-quantized; needs sm_89+ to run fast)")
    p.add_argument("--act-scales", choices=("dynamic", "static"), default="dynamic",
                   help="smoothquant: per-token dynamic activation scales (default) or static per-tensor scales "
                        "calibrated on the photos")
    p.add_argument("--alphas", default=None, metavar="LIST",
                   help="smoothquant: comma list of migration strengths to search per block (default 0,0.1,...,1)")
    p.add_argument("--target", choices=TARGET_CHOICES, default="vllm",
                   help="the runtime that must load the folder (default vllm): sets its defaults and refuses, before "
                        "any work, flags it cannot load; 'any' writes what was asked and warns per consumer")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric quantization (zero = 2**(bits-1)); default for GPTQ formats with --target "
                          "vllm/lmdeploy")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero point per group)")
    p.add_argument("--act-order", action="store_true", help="GPTQ desc_act: columns in descending Hessian diagonal")
    p.add_argument("--static-groups", action="store_true", help="GPTQ: fit groups before act-order permutation "
                   "(natural g_idx)")
    p.add_argument("--mse", action="store_true", help="GPTQ: MSE grid search of each group's range (AutoGPTQ mse)")
    p.add_argument("--gar", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ without --act-order: group-aware reordering (groups in descending Hessian diagonal, "
                        "columns inside each group too, each group keeping its own columns: natural g_idx, loadable "
                        "everywhere; GPTQModel's act_group_aware). Default on; --no-gar: natural column order")
    p.add_argument("--sink-weight", type=float, default=512.0,
                   help="GPTQ: weight of each window's first token (the attention sink, whose key/value every query "
                        "reads) in the LLM k/v Hessians (default 512; 1 = AutoGPTQ's unweighted Hessian)")
    p.add_argument("--damp", type=float, default=0.1,
                   help="GPTQ damping, fraction of mean(diag H) (default 0.1; the paper and AutoGPTQ use 0.01, "
                        "GPTQModel 0.05)")
    p.add_argument("--parts", default=None, help="comma list of vision,llm (default: every part the checkpoint has)")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                   help="glob of Linear names to keep 16-bit (repeatable or comma-separated), "
                        "e.g. 'language_model.model.layers.0.*'")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default=None,
                   help="on-disk format (default: awq for --method awq, else gptq = AutoGPTQ v1)")
    p.add_argument("--calib-images", metavar="DIR", help="calibration images (default: skimage.data photos)")
    p.add_argument("--calib-text", metavar="FILE", help="calibration text, plain or wiki JSON "
                   "(default: Wikipedia intros, calibration split)")
    p.add_argument("--nsamples", type=_pos_int, default=None, help="LLM calibration windows (default 128; demo 16)")
    p.add_argument("--seqlen", type=_pos_int, default=None, help="tokens per window (default 512; demo 256)")
    p.add_argument("--max-calib-images", type=_pos_int, default=None)
    p.add_argument("--max-tiles", type=_pos_int, default=None, help="dynamic tiling max tiles for calibration images")
    p.add_argument("--mm-samples", type=_pos_int, default=None,
                   help="image+text chat-path samples added to the LLM calibration (default 4; demo 2)")
    p.add_argument("--eval-windows", type=_pos_int, default=None, help="held-out text windows (default 16; demo 8)")
    p.add_argument("--eval-offset", type=_pos_int, default=None,
                   help="first held-out window (default 0: the dev part, windows 0-99; 100: the test part)")
    p.add_argument("--eval-protocol", choices=("default", "table"), default="default",
                   help="table: the documented quality protocol (128 calibration windows x 512 tokens, 40 held-out "
                        "test windows 100-139); explicit --nsamples/--seqlen/--eval-windows/--eval-offset win")
    p.add_argument("--eval-images", type=_pos_int, default=None, help="held-out photos (default 4; demo 2)")
    p.add_argument("--batch-size", type=_pos_int, default=4)
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                   help="compute/save dtype of the unquantized tensors (default: the checkpoint's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_pos_int, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default ./quantized-demo for the demo, ./<model>-<method>-w<bits>g<group>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--max-shard-size", type=_size, default=_size("5GB"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="measure only; write no checkpoint")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check"]:
        from .check_cli import main as check_main

        return check_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130


def _early_checks(args) -> str | None:
    """Flags and paths judged before torch is imported or the model loaded (seconds, not minutes, to an error).
    Returns the error message, or None."""
    from .errors import QuantizeError
    from .preflight import check_flags, check_out_vs_model

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) if args.parts else None
    try:
        check_flags(nsamples=args.nsamples, seqlen=args.seqlen, calib_text=args.calib_text,
                    calib_images=args.calib_images, parts=parts)
        if args.model is not None:
            gs = args.group_size if args.group_size is not None else 128
            check_out_vs_model(args.out or _default_out(args.model, args.method, args.bits, gs), args.model)
    except QuantizeError as e:
        return str(e)
    return None


def _default_out(model: str, method: str, bits: int, gs: int) -> str:
    return os.path.join(".", f"{os.path.basename(os.path.normpath(model))}-{method}-w{bits}g{gs}")


def _main(args) -> int:
    err = _early_checks(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from .calib import CalibrationError
    from .engine import QuantSettings
    from .report import format_report
    from .runner import QuantizeError, RunConfig, load_model, run

    from .targets import TargetError, apply_defaults, check_model, check_settings, needs_fp16
    from ._interrupt import check as check_interrupt

    check_interrupt()  # a Ctrl-C swallowed during the imports above
    demo = args.model is None
    try:
        target_notes = apply_defaults(args)
        if demo:
            from .demo import DEMO_DEFAULTS, DEMO_DESCRIPTION

            d = DEMO_DEFAULTS
            print(DEMO_DESCRIPTION, flush=True)
        else:
            d = {"group_size": 128, "nsamples": 128, "seqlen": 512, "eval_windows": 16, "eval_images": 4,
                 "mm_samples": 4, "max_calib_images": None, "max_tiles": None}
        d = dict(d, eval_offset=0)
        if args.eval_protocol == "table":  # scripts/quality_smollm2.py's protocol
            from .calib import TEST_OFFSET

            d.update(nsamples=128, seqlen=512, eval_windows=40, eval_offset=TEST_OFFSET)
        pick = lambda v, k: d[k] if v is None else v  # noqa: E731
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise QuantizeError(f"--device: {e}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise QuantizeError(f"--device {device}: CUDA is not available on this machine")
        if dev.type not in ("cpu", "cuda"):
            raise QuantizeError(f"--device {device}: only cpu and cuda are supported")
        fmt = args.fmt
        gs = pick(args.group_size, "group_size")
        parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) if args.parts else ("vision", "llm")
        skip = tuple(s.strip() for item in args.skip for s in item.split(",") if s.strip())
        st = QuantSettings(method=args.method, bits=args.bits, group_size=gs, sym=args.sym, act_order=args.act_order,
                           static_groups=args.static_groups, mse=args.mse, sink_weight=args.sink_weight,
                           group_order=args.gar and not args.act_order,
                           damp=args.damp, fmt=fmt, skip=skip, device=str(dev), seed=args.seed,
                           progress=not args.no_progress)
        if args.act_order and args.method != "gptq":
            raise QuantizeError(f"--act-order is a GPTQ option; --method {args.method} does not use it")
        if not args.sink_weight > 0:
            raise QuantizeError(f"--sink-weight must be > 0, got {args.sink_weight}")
        if not 0 < args.damp < 10:
            raise QuantizeError(f"--damp must be in (0, 10), got {args.damp}")
        if args.dtype == "auto" and needs_fp16(args.target, st):
            args.dtype = "float16"
            target_notes.append("--dtype float16 (vLLM's plain GPTQ/AWQ kernel, used when Marlin cannot run this "
                                "layout, takes float16 only)")
        try:
            check_settings(args.target, st, parts, None if args.dtype == "auto" else args.dtype)  # refuses early
        except TargetError as e:
            raise QuantizeError(str(e)) from e
        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        if args.method == "smoothquant":
            return _smoothquant(args, demo, d, dev, dtype)
        if demo:
            from .demo import build_demo_model

            lm = build_demo_model(seed=args.seed, dtype=dtype or torch.float32)
            out = args.out or d["out"]
        else:
            lm = load_model(args.model, dtype)
        try:
            avail = {"internvl_chat": ("vision", "llm"), "intern_vit": ("vision",), "llm": ("llm",)}[lm.kind]
            model_dtype = str(next(lm.model.parameters()).dtype).replace("torch.", "")
            more_notes, more_warn = check_model(args.target, lm, st, [p for p in parts if p in avail], model_dtype,
                                                group_given=args.group_size is not None,
                                                dtype_given=args.dtype != "auto")
        except TargetError as e:
            raise QuantizeError(str(e)) from e
        target_notes += more_notes
        if not demo:
            out = args.out or _default_out(args.model, args.method, args.bits, st.group_size)
        for n in target_notes:
            print(f"--target {args.target}: {n}", file=sys.stderr)
        # the model-level layout is the flag-level one plus the model's facts: its warnings supersede the flag-level
        # ones (check_settings ran before loading, to refuse early)
        for w in dict.fromkeys(more_warn):
            print(f"warning (--target {args.target}): {w}", file=sys.stderr)
        rc = RunConfig(settings=st, parts=parts, target=args.target, nsamples=pick(args.nsamples, "nsamples"),
                       seqlen=pick(args.seqlen, "seqlen"), calib_images=args.calib_images, calib_text=args.calib_text,
                       max_calib_images=pick(args.max_calib_images, "max_calib_images"),
                       max_tiles=pick(args.max_tiles, "max_tiles"), eval_windows=pick(args.eval_windows, "eval_windows"),
                       eval_offset=pick(args.eval_offset, "eval_offset"),
                       eval_images=pick(args.eval_images, "eval_images"), mm_samples=pick(args.mm_samples, "mm_samples"),
                       batch_size=max(1, args.batch_size), out=out, overwrite=args.overwrite,
                       max_shard_size=args.max_shard_size, write=not args.no_write)
        report = run(rc, lm)
    except (QuantizeError, CalibrationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return _print_report(args, report, demo, format_report)


def _print_report(args, report, demo, format_report):
    if demo:
        from .demo import DEMO_DESCRIPTION

        report["demo"] = DEMO_DESCRIPTION
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        if demo:
            print("(this was the DEMO: real SmolLM2-135M LLM + random-init InternViT; see the first line)")
    return 0


def _smoothquant(args, demo, d, dev, dtype) -> int:
    """``--method smoothquant``: W8A8 of the vision tower → compressed-tensors folder + SQNR report."""
    from .runner import QuantizeError, load_model
    from .smoothquant import DEFAULT_ALPHAS, SmoothQuantSettings, format_smoothquant_report, run_smoothquant

    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip()) if args.parts else ("vision",)
    if parts != ("vision",):
        raise QuantizeError(f"--method smoothquant quantizes the vision tower only: use --parts vision "
                            f"(got --parts {args.parts})")
    try:
        alphas = tuple(float(a) for a in args.alphas.split(",")) if args.alphas else DEFAULT_ALPHAS
    except ValueError:
        raise QuantizeError(f"--alphas: not a comma list of numbers: {args.alphas!r}") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise QuantizeError(f"--alphas: every value must lie in [0, 1], got {args.alphas!r}")
    if demo:
        from .demo import build_demo_model

        lm = build_demo_model(seed=args.seed, dtype=dtype or torch_float32())
        out = args.out or d["out"] + "-w8a8"
    else:
        lm = load_model(args.model, dtype)
        out = args.out or os.path.join(".", f"{os.path.basename(os.path.normpath(args.model))}-smoothquant-"
                                            f"w8a8-{args.w8a8_dtype}")
    st = SmoothQuantSettings(quant_dtype=args.w8a8_dtype, act_scales=args.act_scales, alphas=alphas,
                             device=str(dev), progress=not args.no_progress)
    report = run_smoothquant(lm, st, calib_images=args.calib_images, max_calib_images=args.max_calib_images,
                             max_tiles=args.max_tiles, eval_images=args.eval_images if args.eval_images is not None
                             else d["eval_images"], out=out, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size, write=not args.no_write)
    return _print_report(args, report, demo, lambda r: format_smoothquant_report(r))


def torch_float32():
    import torch

    return torch.float32
