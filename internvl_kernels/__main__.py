"""``python -m internvl_kernels [--json] [--require-cuda-ext]``: the status report
(:mod:`internvl_kernels.status_report`).

``python -m internvl_kernels aot-check [--all]``: compile every Triton kernel for sm_90 without a GPU
(:mod:`internvl_kernels.ops.aot_check`; needs ``TRITON_INTERPRET`` unset).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["aot-check"]:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("aot-check: unset TRITON_INTERPRET to compile for the GPU", file=sys.stderr)
            return 2
        from .ops import aot_check

        return aot_check.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m internvl_kernels",
                                description="Status report: versions, the CUDA extension, and which backend each "
                                            "op uses on this machine and why. Subcommand: aot-check [--all].")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--require-cuda-ext", action="store_true",
                   help="exit 1 unless the CUDA extension is loaded and registered every op")
    p.add_argument("--device", default=None, help="evaluate the op choice for tensors on this device "
                                                  "(default: cuda when a GPU is visible, else cpu)")
    args = p.parse_args(argv)
    from .status_report import cuda_extension_problem, format_status, status

    st = status(args.device)
    print(json.dumps(st, indent=2) if args.json else format_status(st))
    if args.require_cuda_ext:
        problem = cuda_extension_problem(st)
        if problem:
            print(f"--require-cuda-ext: {problem}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
