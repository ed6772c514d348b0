"""The status report: ``python -m internvl_kernels`` (versions, the CUDA extension, per-op backend and why),
``--require-cuda-ext`` and the public :func:`internvl_kernels.status`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import internvl_kernels
from internvl_kernels import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("INTERNVL_KERNELS_NO_CUDA", "INTERNVL_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, "-m", "internvl_kernels", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def report():
    return _cli()


def test_status_cli_exits_0_and_lists_every_op_with_reasons(report):
    assert report.returncode == 0, report.stderr[-2000:]
    out = report.stdout
    assert f"torch {torch.__version__}" in out and "triton" in out and "GPU:" in out and "CUDA extension:" in out
    lines = out.splitlines()
    for op in ops.OPS:
        i = next(k for k, line in enumerate(lines) if line.split() and line.split()[0] == op)
        assert "->" in lines[i]
        rows = lines[i + 1:i + 4]  # one row per implementation: cuda, triton, eager, each with its reason
        assert [r.split()[1] for r in rows] == ["cuda", "triton", "eager"], rows
        assert all(len(r.split()) > 3 for r in rows), rows


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the extension may be built")
def test_status_cli_cpu_machine_says_the_extension_is_missing(report):
    assert "CUDA extension: not built" in report.stdout or "built but not used" in report.stdout
    assert "-> eager" in report.stdout  # CPU tensors under the default backend run the references


def test_require_cuda_ext_fails_with_the_reason_when_the_extension_is_missing():
    from internvl_kernels.ops import _cuda

    if _cuda.available():
        pytest.skip("the CUDA extension is loaded here")
    r = _cli("--require-cuda-ext")
    assert r.returncode != 0
    assert "--require-cuda-ext:" in r.stderr and _cuda.unavailable_reason() in r.stderr


def test_status_json_and_the_public_function_agree():
    r = _cli("--json")
    assert r.returncode == 0, r.stderr[-2000:]
    cli = json.loads(r.stdout)
    st = internvl_kernels.status()
    assert set(cli["ops"]) == set(st["ops"]) == set(ops.OPS)
    for op, d in st["ops"].items():
        assert d["backend"] == cli["ops"][op]["backend"]
        assert [c["backend"] for c in d["candidates"]] == ["cuda", "triton", "eager"]
        assert all(c["reason"] for c in d["candidates"])
        chosen = next(c for c in d["candidates"] if c["ok"])
        assert chosen["backend"] == d["backend"]
    assert st["torch"] == torch.__version__ and st["cuda_extension"]["expected_ops"]
    assert st["cuda_extension"]["loaded"] == bool(st["cuda_extension"]["registered_ops"])


def test_status_for_the_triton_interpreter_on_cpu():
    with internvl_kernels.set_backend("triton"):
        st = internvl_kernels.status("cpu")
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for d in st["ops"].values():
        assert d["backend"] == ("triton" if interp else "eager")


def test_bad_flag_exits_2():
    assert _cli("--bogus").returncode == 2
