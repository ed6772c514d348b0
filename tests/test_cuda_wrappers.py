"""internvl_kernels/ops/_cuda.py on the CPU: the extension loader (missing / mismatched / opted out -> one log line,
nothing registered) and the routing of every wrapper (which calls reach the CUDA kernels, which go to Triton, and
with which converted arguments), with the extension replaced by recorders; the ``can_implement`` reasons. The
kernels themselves are tested on a GPU by the ``gpu_backend`` rows of each op's tests/test_<op>.py."""
from __future__ import annotations

import logging
import sys
import types

import pytest
import torch

from internvl_kernels import _backend
from internvl_kernels.ops import _cuda


# ------------------------------------------------------------------------------------------------------ loader
@pytest.fixture(autouse=True)
def _no_opt_out(monkeypatch):
    """The loader tests describe a normal environment: a user's INTERNVL_KERNELS_NO_CUDA must not leak in
    (the opt-out has its own test, which sets it)."""
    monkeypatch.delenv("INTERNVL_KERNELS_NO_CUDA", raising=False)


def test_missing_extension_reason():
    if "internvl_kernels._C" in sys.modules:
        pytest.skip("the extension is built here")
    ext, reason = _cuda._load()
    assert ext is None and "not built" in reason and "--no-build-isolation" in reason


def test_opt_out(monkeypatch):
    monkeypatch.setenv("INTERNVL_KERNELS_NO_CUDA", "1")
    assert _cuda._load() == (None, "INTERNVL_KERNELS_NO_CUDA is set")


def _fake_ext(monkeypatch, info):
    fake = types.ModuleType("internvl_kernels._C")
    fake.build_info = lambda: info
    fake.set_poison = lambda v: None
    monkeypatch.setitem(sys.modules, "internvl_kernels._C", fake)
    import internvl_kernels

    monkeypatch.setattr(internvl_kernels, "_C", fake, raising=False)
    return fake


def test_torch_version_mismatch(monkeypatch):
    _fake_ext(monkeypatch, "torch=1.13.0;cuda=11.7")
    ext, reason = _cuda._load()
    assert ext is None and "built against torch 1.13.0" in reason and "rebuild" in reason


def test_cuda_major_mismatch(monkeypatch):
    ver = torch.__version__.split("+")[0]
    _fake_ext(monkeypatch, f"torch={ver};cuda=11.8")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    ext, reason = _cuda._load()
    assert ext is None and "CUDA 11.8" in reason and "13.0" in reason


def test_ops_missing_from_extension(monkeypatch):
    ver = torch.__version__.split("+")[0]
    _fake_ext(monkeypatch, f"torch={ver};cuda=13.0")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    if hasattr(torch.ops, "internvl_kernels_cuda") and hasattr(torch.ops.internvl_kernels_cuda, "rms_norm"):
        pytest.skip("the real extension is loaded")
    ext, reason = _cuda._load()
    assert ext is None and "lacks the ops" in reason


def test_init_logs_one_line_and_registers_nothing(monkeypatch, caplog):
    monkeypatch.setattr(_cuda, "_load", lambda: (None, "a reason"))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA torch: WARNING level
    before = {op: _backend.available_impls(op) for op in _cuda.OPS}
    with caplog.at_level(logging.INFO, logger="internvl_kernels"):
        _cuda._init()
    lines = [r for r in caplog.records if "CUDA backend unavailable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and "a reason" in lines[0].getMessage()
    assert {op: _backend.available_impls(op) for op in _cuda.OPS} == before
    assert not _cuda.available()


def test_init_is_quiet_on_cpu_torch(monkeypatch, caplog):
    monkeypatch.setattr(_cuda, "_load", lambda: (None, "not built"))
    monkeypatch.setattr(torch.version, "cuda", None)
    with caplog.at_level(logging.INFO, logger="internvl_kernels"):
        _cuda._init()
    lines = [r for r in caplog.records if "CUDA backend unavailable" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO


# ----------------------------------------------------------------------------------------------------- routing
class Recorder:
    def __init__(self):
        self.calls = []

    def call(self, op, *args):
        self.calls.append(("cuda", op, args))
        return "cuda-result"

    def fallback(self, op):
        def f(*args):
            self.calls.append(("triton", op, args))
            return "triton-result"

        return f


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(_cuda, "_call", r.call)
    monkeypatch.setattr(_cuda, "_fallback", r.fallback)
    monkeypatch.setattr(_cuda, "_sm80", lambda t: True)
    return r


def t(*shape, dtype=torch.float16):
    return torch.zeros(*shape, dtype=dtype)


def test_norm_routing(rec):
    x, w = t(2, 8), t(8)
    assert _cuda.rms_norm(x, w, 1e-6) == "cuda-result"
    assert rec.calls[-1] == ("cuda", "rms_norm", (x, w, 1e-6))
    assert _cuda.rms_norm(x, t(8, dtype=torch.float32)) == "triton-result"  # promoted output dtype
    assert _cuda.layer_norm(x, None, None, 1e-5) == "cuda-result"
    assert _cuda.add_rms_norm(x, x, w, 1e-6, None) == "cuda-result"
    assert _cuda.add_layer_norm(x, x, w, t(8, dtype=torch.bfloat16), 1e-6, None) == "triton-result"
    xf = t(2, 8, dtype=torch.float32)
    assert _cuda.layer_norm(xf, t(8, dtype=torch.float32), None) == "cuda-result"  # fp32 norms are native


def test_pixel_shuffle_routing(rec):
    x = t(1, 16, 4)
    _cuda.pixel_shuffle(x, 0.5, "v1")
    assert rec.calls[-1] == ("cuda", "pixel_shuffle", (x, 2, False))
    _cuda.pixel_shuffle(x, 1 / 3, "v2")
    assert rec.calls[-1][2][1:] == (3, True)
    w = t(16)
    _cuda.pixel_shuffle_layer_norm(x, w, w, 0.5, "v2", 1e-5)
    assert rec.calls[-1] == ("cuda", "pixel_shuffle_layer_norm", (x, w, w, 2, True, 1e-5))


def test_attention_routing(rec):
    q = t(1, 5, 2, 64)
    assert _cuda.attention(q, q, q, None) == "cuda-result"
    assert rec.calls[-1][2][3] is None
    assert _cuda.attention(q, q, q, 0.5) == "cuda-result" and rec.calls[-1][2][3] == 0.5
    assert _cuda.attention(t(1, 5, 2, 96), t(1, 5, 2, 96), t(1, 5, 2, 96)) == "triton-result"
    qf = t(1, 5, 2, 64, dtype=torch.float32)
    assert _cuda.attention(qf, qf, qf) == "triton-result"


def test_qk_norm_attention_routing(rec):
    qkv, w = t(1, 5, 3 * 256), t(256)
    assert _cuda.qk_norm_attention(qkv, w, w, 4, 1e-6, None) == "cuda-result"
    assert rec.calls[-1] == ("cuda", "qk_norm_attention", (qkv, w, w, 4, 1e-6, None))
    assert _cuda.qk_norm_attention(qkv, w, w, 8, 1e-6, None) == "triton-result"  # head_dim 32
    assert _cuda.qk_norm_attention(qkv, t(256, dtype=torch.float32), w, 4) == "triton-result"
    qkv32 = t(1, 5, 3 * 256, dtype=torch.float32)
    assert _cuda.qk_norm_attention(qkv32, t(256, dtype=torch.float32), t(256, dtype=torch.float32), 4) == \
        "triton-result"


def test_quant_matmul_routing(rec):
    K, N = 256, 64
    x = t(3, K)
    qw, sc, qz = torch.zeros(K // 8, N, dtype=torch.int32), t(2, N), torch.zeros(2, N // 8, dtype=torch.int32)
    assert _cuda.quant_matmul(x, qw, sc, qz, None, None, 4, 128, "gptq") == "cuda-result"
    assert _cuda.quant_matmul(t(16, K), qw, sc, qz, None, None, 4, 128, "gptq") == "cuda-result"
    assert rec.calls[-1][2][-3:] == (4, 128, 1)  # v1: zero = stored + 1
    _cuda.quant_matmul(x, qw, sc, qz, None, None, 4, 128, "gptq_v2")
    assert rec.calls[-1][2][-1] == 0
    g64 = torch.arange(K, dtype=torch.int64) // 128
    _cuda.quant_matmul(x, qw, sc, qz, g64, None, 4, 128, "gptq")
    assert rec.calls[-1][0] == "cuda" and rec.calls[-1][2][4].dtype == torch.int32
    for args in [
        (x, qw, sc, qz, None, None, 4, 128, "awq"),
        (x, torch.zeros(K * 3 // 32, N, dtype=torch.int32), sc, qz, None, None, 3, 128, "gptq"),
        (t(17, K), qw, sc, qz, None, None, 4, 128, "gptq"),  # M > 16: one CUDA m-tile only
        (t(3, K, dtype=torch.float32), qw, sc, qz, None, None, 4, 128, "gptq"),
        (t(3, 8), torch.zeros(1, N, dtype=torch.int32), sc, qz, None, None, 4, 128, "gptq"),  # K % 16
        (x, torch.zeros(K // 8, 48, dtype=torch.int32), t(2, 48), qz, None, None, 4, 128, "gptq"),  # N % 32
    ]:
        assert _cuda.quant_matmul(*args) == "triton-result", args[-1]


def test_old_gpu_routes_everything(rec, monkeypatch):
    monkeypatch.setattr(_cuda, "_sm80", lambda t: False)
    x, w = t(2, 8), t(8)
    assert _cuda.rms_norm(x, w) == "triton-result"
    assert _cuda.pixel_shuffle(t(1, 16, 4)) == "triton-result"
    assert _cuda.mlp_projector(x, w, w, t(4, 8), t(4), t(4, 4), t(4)) == "triton-result"


def test_wrappers_cover_every_op():
    assert set(_cuda._WRAPPERS) == set(_cuda.OPS)
    from internvl_kernels import ops

    for op in _cuda.OPS:
        assert "triton" in _backend.available_impls(op) or op == "quant_matmul", op
    assert hasattr(ops, "quant_matmul")


def test_can_implement_says_why_and_the_reason_is_kept(rec):
    q96, q64 = t(1, 5, 2, 96), t(1, 5, 2, 64)
    assert _cuda.attention.can_implement(q64, q64, q64) == (True, "ok")
    ok, why = _cuda.attention.can_implement(q96, q96, q96)
    assert not ok and "head_dim 96" in why
    ok, why = _cuda.attention.can_implement(*(t(1, 5, 2, 64, dtype=torch.float32),) * 3)
    assert not ok and "float32" in why
    K, N = 256, 64
    qw, sc, qz = torch.zeros(K // 8, N, dtype=torch.int32), t(2, N), torch.zeros(2, N // 8, dtype=torch.int32)
    ok, why = _cuda.quant_matmul.can_implement(t(17, K), qw, sc, qz, None, None, 4, 128, "gptq")
    assert not ok and "M=17" in why
    ok, why = _cuda.quant_matmul.can_implement(t(3, K), qw, sc, qz, None, None, 4, 128, "awq")
    assert not ok and "'awq'" in why
    ok, why = _cuda.rms_norm.can_implement(t(2, 8), t(8, dtype=torch.float32))
    assert not ok and "mixed dtypes" in why and "weight" in why
    # a call handed on is recorded with its reason (status report / debug log)
    assert _cuda.attention(q96, q96, q96) == "triton-result"
    assert "head_dim 96" in _backend.rejections()[("attention", "cuda")]


def test_old_gpu_reason(rec, monkeypatch):
    monkeypatch.setattr(_cuda, "_sm80", lambda t: False)
    ok, why = _cuda.pixel_shuffle.can_implement(t(1, 16, 4))
    assert not ok and "sm_80" in why
