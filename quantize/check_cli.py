"""``python -m quantize check <folder> [--target T] [--json]`` and ``python -m quantize check --table``.

Reads a quantized folder (written by this tool, AutoGPTQ, GPTQModel, AutoAWQ or lmdeploy) and reports, per
consumer, loads / refuses / loads-wrong with the reason and the flag to change, plus the layout facts. Exit code 0
when the folder loads in the target's consumers (or no target was given), 1 when it does not, 2 on a folder that
cannot be read. ``--table`` prints the README's "which folder loads where" table generated from the rule table.
"""
from __future__ import annotations

import argparse
import json
import sys

from internvl_kernels.quant.checker import CheckError, check_folder, format_check
from internvl_kernels.quant.consumers import TARGETS, markdown_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantize check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("folder", nargs="?", help="a quantized checkpoint folder")
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="exit 1 unless the folder loads in this target's consumers")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--table", action="store_true", help="print the generated 'which folder loads where' table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.table:
        print(markdown_table())
        return 0
    if not args.folder:
        print("error: give a folder to check (or --table)", file=sys.stderr)
        return 2
    try:
        rep = check_folder(args.folder, args.target)
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=2) if args.json else format_check(rep))
    return 0 if rep.get("target", {}).get("ok", True) else 1
