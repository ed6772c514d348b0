"""The GPU build of every Triton kernel: compiled for an H100 (sm_90, through ptxas) on any machine, no GPU needed.

The CPU suite runs the kernels in the interpreter, which checks what they compute but not that they compile for a
GPU (tensor-core dot shapes, layouts, shared memory). This test compiles one representative configuration per
kernel and dtype path and checks its shared memory against the H100's limit and that ptxas reports no register
spills; ``python -m
internvl_kernels.ops.aot_check --all`` does the same for every autotune configuration.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "internvl_kernels.ops.aot_check"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    if r.returncode != 0 and "ptxas" in (r.stdout + r.stderr) and "not found" in (r.stdout + r.stderr).lower():
        pytest.skip("this triton install has no bundled ptxas")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "all kernels compile for sm_90" in r.stdout and "SPILL" not in r.stdout
    assert r.stdout.count("ok ") >= 20  # (attention's query-tail tile is compiled into each attention config)
    # the W8A8 kernels (norm + quantization, int8 / fp8 GEMM) are in the list
    assert r.stdout.count("ok    norm_quant") >= 7 and r.stdout.count("ok    int8_matmul") >= 5
