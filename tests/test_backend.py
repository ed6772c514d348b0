"""The backend switch as the ops use it: set_backend / context manager / env var, resolve(), dispatch, registry."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import internvl_kernels
from internvl_kernels import _backend, get_backend, ops, set_backend
from internvl_kernels.model import functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_op_has_eager_and_triton_impls():
    for op in ops.OPS:
        impls = _backend.available_impls(op)
        assert "eager" in impls and "triton" in impls, (op, impls)


def test_set_backend_and_context_manager():
    start = get_backend()
    with set_backend("eager"):
        assert get_backend() == "eager"
        with internvl_kernels.backend("triton"):
            assert get_backend() == "triton"
        assert get_backend() == "eager"
    assert get_backend() == start
    with pytest.raises(ValueError, match="unknown backend"):
        set_backend("tpu")


def test_resolve_on_cpu_with_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    with set_backend("auto"):
        assert _backend.resolve("rms_norm", cpu) == "eager"  # auto never runs the interpreter by itself
    with set_backend("eager"):
        assert _backend.resolve("rms_norm", cpu) == "eager"
    with set_backend("triton"):
        assert _backend.resolve("rms_norm", cpu) == "triton"
    with set_backend("cuda"):  # no CUDA kernels on CPU tensors: the next best is Triton
        assert _backend.resolve("rms_norm", cpu) == "triton"


def test_resolve_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with set_backend("triton"):
        assert _backend.resolve("attention", torch.device("cpu")) == "eager"


def test_resolve_on_cuda_and_the_cuda_one_liner(monkeypatch):
    # a CUDA implementation is one register_impl call; resolve() prefers it on CUDA tensors under auto/cuda
    table = dict(_backend._IMPLS["rms_norm"])
    table.pop("cuda", None)  # where the extension is built, its kernel is registered already
    monkeypatch.setitem(_backend._IMPLS, "rms_norm", table)
    cuda = torch.device("cuda")
    with set_backend("auto"):
        assert _backend.resolve("rms_norm", cuda) == "triton"
    _backend.register_impl("rms_norm", "cuda", lambda x, w, eps: x)
    with set_backend("auto"):
        assert _backend.resolve("rms_norm", cuda) == "cuda"
    with set_backend("triton"):
        assert _backend.resolve("rms_norm", cuda) == "triton"
    with set_backend("eager"):
        assert _backend.resolve("rms_norm", cuda) == "eager"


def test_candidates_and_can_implement_say_why(monkeypatch):
    monkeypatch.setitem(_backend._IMPLS, "rms_norm", dict(_backend._IMPLS["rms_norm"]))
    monkeypatch.setattr(_backend, "_CAN", dict(_backend._CAN))
    monkeypatch.setattr(_backend, "_UNAVAILABLE", {})
    _backend.register_impl("rms_norm", "cuda", lambda x, w, eps=1e-6: x,
                           can_implement=lambda x, w, eps=1e-6: (x.dtype != torch.float32, "fp32 input"))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with set_backend("auto"):
        rows = _backend.candidates("rms_norm", cuda)
        assert [(n, ok) for n, ok, _ in rows] == [("cuda", True), ("triton", True), ("eager", True)]
        x, w = torch.zeros(2, 8), torch.zeros(8)
        rows = _backend.explain("rms_norm", cuda, x, w, 1e-6)
        assert rows[0] == ("cuda", False, "fp32 input") and rows[1][:2] == ("triton", True)
        assert _backend.explain("rms_norm", cuda, x.half(), w.half(), 1e-6)[0] == ("cuda", True, "fp32 input")
        rows = dict((n, (ok, why)) for n, ok, why in _backend.candidates("rms_norm", cpu))
        assert rows["cuda"] == (False, "cpu tensors (the CUDA extension runs on CUDA tensors)")
        assert not rows["triton"][0] and "auto" in rows["triton"][1] and rows["eager"][0]
    with set_backend("eager"):
        rows = dict((n, (ok, why)) for n, ok, why in _backend.candidates("rms_norm", cuda))
        assert rows["cuda"] == (False, "backend 'eager' selected") and _backend.resolve("rms_norm", cuda) == "eager"
    with set_backend("triton"):
        assert dict((n, why) for n, _, why in _backend.candidates("rms_norm", cuda))["cuda"] == \
            "backend 'triton' selected"
    # a backend that cannot load says why for every op it would serve (as when the extension is absent: no cuda
    # implementation registered)
    monkeypatch.setitem(_backend._IMPLS, "layer_norm",
                        {k: v for k, v in _backend._IMPLS["layer_norm"].items() if k != "cuda"})
    _backend.set_unavailable("cuda", "extension not used: built against another torch")
    rows = dict((n, (ok, why)) for n, ok, why in _backend.candidates("layer_norm", cuda))
    assert rows["cuda"] == (False, "extension not used: built against another torch")


def test_dispatch_really_calls_the_selected_impl(monkeypatch, device):
    calls = {"eager": 0, "triton": 0}
    table = dict(_backend._IMPLS["layer_norm"])
    for name in ("eager", "triton"):
        def counted(*a, _f=table[name], _n=name):
            calls[_n] += 1
            return _f(*a)
        table[name] = counted
    monkeypatch.setitem(_backend._IMPLS, "layer_norm", table)
    x, w, b = torch.randn(3, 40, device=device), torch.randn(40, device=device), torch.randn(40, device=device)
    before = ops.launches("layer_norm")
    with set_backend("triton"):
        y = ops.layer_norm(x, w, b, 1e-5)
    assert calls == {"eager": 0, "triton": 1}
    assert ops.launches("layer_norm") == before + 1  # and the Triton kernel was launched
    with set_backend("eager"):
        y_ref = ops.layer_norm(x, w, b, 1e-5)
    assert calls == {"eager": 1, "triton": 1}
    assert torch.equal(y_ref, F.layer_norm(x, w, b, 1e-5))
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_triton_backend_is_not_a_silent_fallback(device):
    # the triton backend on CPU runs the kernels (interpreter), observable through the launch counter
    if device.type == "cpu" and not _backend.triton_interpret():
        pytest.skip("TRITON_INTERPRET is not set")
    before = ops.launches("pixel_shuffle")
    with set_backend("triton"):
        ops.pixel_shuffle(torch.randn(1, 16, 4, device=device))
    assert ops.launches("pixel_shuffle") == before + 1
    with set_backend("eager"):
        ops.pixel_shuffle(torch.randn(1, 16, 4, device=device))
    assert ops.launches("pixel_shuffle") == before + 1


def _run(code: str, **env):
    full = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=ROOT,
                          timeout=120)


def test_environment_variable_selects_the_backend():
    r = _run("import internvl_kernels as k; print(k.get_backend())", INTERNVL_KERNELS_BACKEND="eager")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "eager"
    r = _run("import internvl_kernels", INTERNVL_KERNELS_BACKEND="bogus")
    assert r.returncode != 0 and "INTERNVL_KERNELS_BACKEND" in r.stderr


def test_environment_variable_triton_runs_kernels_under_the_interpreter():
    code = (
        "import torch, internvl_kernels as k\n"
        "from internvl_kernels import ops\n"
        "ops.rms_norm(torch.randn(2, 8), torch.ones(8))\n"
        "print(k.get_backend(), ops.launches('rms_norm'))\n"
    )
    r = _run(code, INTERNVL_KERNELS_BACKEND="triton", TRITON_INTERPRET="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["triton", "1"]
