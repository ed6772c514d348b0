"""Launch plumbing of the Triton wrappers (internvl_kernels/ops/_common.py), checked on the CPU under the interpreter:

* every Triton wrapper enters the inputs' device (``torch.cuda.device(x.device)`` on CUDA) before it launches;
* no autotuning inside a CUDA-graph capture: an untuned key launches a fixed config and warns once; tune-ahead
  (``ops.warmup``) tunes before capturing; the key computation matches triton's ``Autotuner``;
* ``linear`` tunes per power-of-two bucket of M, not per exact M;
* attention's small query tail (S = 1025 = 16 × 64 + 1 here) is one extra program of the same launch.
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch
import triton

from internvl_kernels import ops, set_backend
from internvl_kernels.model import functional as F
from internvl_kernels.ops import _common
from internvl_kernels.ops.quant_matmul import packed_shapes

att_mod = importlib.import_module("internvl_kernels.ops.attention")  # (the package exports functions of these names)
lin_mod = importlib.import_module("internvl_kernels.ops.linear")

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")


def _qmm_args():
    K, N, gs = 256, 64, 128
    shp = packed_shapes(K, N, 4, gs, "gptq")
    g = torch.Generator().manual_seed(0)
    qw = torch.randint(-2**31, 2**31 - 1, shp["qweight"], generator=g, dtype=torch.int64).to(torch.int32)
    qz = torch.randint(-2**31, 2**31 - 1, shp["qzeros"], generator=g, dtype=torch.int64).to(torch.int32)
    sc = (torch.rand(shp["scales"], generator=g) * 1e-2 + 1e-3).to(torch.float32)
    return (torch.randn(3, K), qw, sc, qz, None, 4, gs, "gptq")


def _cases():
    r = torch.randn
    C = 64
    qkv = r(1, 5, 3 * C)
    q, k, v = qkv.reshape(1, 5, 3, 1, 64).unbind(2)
    return {
        "rms_norm": (ops.rms_norm, (r(2, 3, C), r(C), 1e-6)),
        "layer_norm": (ops.layer_norm, (r(2, 3, C), r(C), r(C), 1e-6)),
        "add_rms_norm": (ops.add_rms_norm, (r(2, 3, C), r(2, 3, C), r(C), 1e-6, r(C))),
        "add_layer_norm": (ops.add_layer_norm, (r(2, 3, C), r(2, 3, C), r(C), r(C), 1e-6, r(C))),
        "attention": (ops.attention, (q, k, v, 0.125)),
        "qk_norm_attention": (ops.qk_norm_attention, (qkv, r(C), r(C), 1, 1e-6, 0.125)),
        "pixel_shuffle": (ops.pixel_shuffle, (r(1, 16, 8), 0.5, "v2")),
        "pixel_shuffle_layer_norm": (ops.pixel_shuffle_layer_norm, (r(1, 16, 8), r(32), r(32), 0.5, "v2", 1e-5)),
        "linear": (ops.linear, (r(3, 32), r(16, 32), r(16), "gelu")),
        "mlp_projector": (ops.mlp_projector, (r(1, 4, 32), r(32), r(32), r(16, 32), r(16), r(16, 16), r(16), 1e-5)),
        "quant_matmul": (ops.quant_matmul, _qmm_args()),
        # W8A8: norm + per-token int8 quantization, the scaled int8 GEMM and its raw int32 accumulator
        "add_rms_norm_quant": (ops.add_rms_norm_quant, (r(2, 3, C), r(2, 3, C), r(C), 1e-6, r(C), "int8", None)),
        "add_layer_norm_quant": (ops.add_layer_norm_quant, (r(2, 3, C), r(2, 3, C), r(C), r(C), 1e-6, r(C), "int8",
                                                            None)),
        "rms_norm_quant": (ops.rms_norm_quant, (r(2, 3, C), r(C), 1e-6, "int8", None)),
        "layer_norm_quant": (ops.layer_norm_quant, (r(2, 3, C), r(C), r(C), 1e-6, "int8", None)),
        "quantize_per_token": (ops.quantize_per_token, (r(2, 3, C), "int8", None)),
        "int8_matmul": (ops.int8_matmul, (_i8(3, 32), torch.rand(3) + 0.01, _i8(16, 32), torch.rand(16) + 0.01,
                                          r(16), "gelu", torch.float32)),
        "int8_matmul_accumulate": (ops.int8_matmul_accumulate, (_i8(3, 32), _i8(16, 32))),
    }


def _i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def test_cases_cover_every_op():
    assert set(_cases()) == set(ops.OPS)


@pytest.mark.parametrize("op", sorted(_cases()))
def test_triton_wrapper_enters_device_guard(monkeypatch, op):
    entered = []
    real = _common.device_guard

    def counting_guard(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(_common, "device_guard", counting_guard)
    fn, args = _cases()[op]
    before = ops.launches()
    with set_backend("triton"):
        out = fn(*args)
    assert ops.launches() > before, f"{op}: no Triton kernel ran"
    assert entered and all(d == args[0].device for d in entered), f"{op}: launched without entering the device guard"
    for t in out if isinstance(out, tuple) else (out,):
        assert torch.isfinite(t).all()


def test_device_guard_kinds():
    import contextlib

    assert isinstance(_common.device_guard(torch.zeros(1)), contextlib.nullcontext)


# ------------------------------------------------------------------------------------------------ capture
class _FakeKernel:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *a, **kw: self.log.append(("fixed", grid, kw))


class _FakeTuner:
    """The attributes of triton's Autotuner that launch_tuned reads."""

    def __init__(self):
        self.log = []
        self.arg_names = ["X", "M", "N", "BLOCK"]
        self.keys = ["M", "N"]
        self.configs = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)]
        self.cache = {}
        self.fn = _FakeKernel(self.log)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("tuned", grid, kwargs))
            self.cache[_common.tuning_key(self, args, kwargs)] = self.configs[1]

        return run


def test_capture_uses_fixed_config_and_warns_once(monkeypatch, caplog):
    monkeypatch.setattr(_common, "capturing", lambda: True)
    monkeypatch.setattr(_common, "_WARNED", set())
    tuner = _FakeTuner()
    x = torch.zeros(4)
    prune = lambda cfgs, nargs, **kw: [c for c in cfgs if c.kwargs["BLOCK"] == 128]  # noqa: E731
    with caplog.at_level(logging.WARNING, logger="internvl_kernels"):
        _common.launch_tuned("fake_op", tuner, (3,), x, 100, 7, prune=prune, FLAG=True)
        _common.launch_tuned("fake_op", tuner, (3,), x, 200, 7, prune=prune, FLAG=True)
    assert [e[0] for e in tuner.log] == ["fixed", "fixed"]
    assert tuner.log[0][2] == {"FLAG": True, **tuner.configs[1].all_kwargs()}  # the first config the pruning keeps
    assert tuner.log[0][2]["BLOCK"] == 128 and tuner.log[0][2]["num_warps"] == 8
    assert tuner.cache == {}  # nothing was benchmarked
    warnings = [r for r in caplog.records if "CUDA-graph capture" in r.getMessage()]
    assert len(warnings) == 1 and "fake_op" in warnings[0].getMessage()


def test_tuned_key_inside_capture_uses_the_tuned_config(monkeypatch):
    tuner = _FakeTuner()
    x = torch.zeros(4)
    monkeypatch.setattr(_common, "capturing", lambda: False)
    _common.launch_tuned("fake_op", tuner, (1,), x, 100, 7)  # tunes (outside capture)
    monkeypatch.setattr(_common, "capturing", lambda: True)
    _common.launch_tuned("fake_op", tuner, (1,), x, 100, 7)  # same key: cached -> the autotuner's own launch
    _common.launch_tuned("fake_op", tuner, (1,), x, 101, 7)  # new key -> fixed config
    assert [e[0] for e in tuner.log] == ["tuned", "tuned", "fixed"]


def test_warmup_tunes_ahead_and_refuses_inside_capture(monkeypatch):
    tuner = _FakeTuner()
    monkeypatch.setitem(_common.TUNERS, "fake", tuner)
    x = torch.zeros(4)
    monkeypatch.setattr(_common, "capturing", lambda: False)
    out, n = ops.warmup(lambda m: (_common.launch_tuned("fake_op", tuner, (1,), x, m, 7), m)[1], 64)
    assert out == 64 and n == 1
    monkeypatch.setattr(_common, "capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
        ops.warmup(lambda: None)


def test_tuning_key_matches_triton_autotuner():
    """The key launch_tuned looks up is the one triton's Autotuner.run caches under (its key args + dtypes)."""
    @triton.jit
    def _k(X, M, N, BLOCK: triton.language.constexpr):
        pass

    tuner = triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["M", "N"])(_k)
    for attr in ("arg_names", "keys", "configs", "cache", "fn"):
        assert hasattr(tuner, attr), f"triton's Autotuner has no {attr!r} any more: update _common.launch_tuned"
    x = torch.zeros(2, dtype=torch.float16)
    assert _common.tuning_key(tuner, (x, 5, 6), {}) == (5, 6, "torch.float16")
    for name in ("linear", "attention", "quant_matmul.splitk", "quant_matmul.gemm"):
        assert name in _common.TUNERS


# ----------------------------------------------------------------------------------------------- linear bucket
def test_linear_tunes_per_m_bucket(monkeypatch):
    seen = []
    real = lin_mod.launch_tuned

    def record(name, tuner, grid, *args, **kwargs):
        seen.append(_common.tuning_key(tuner, args, {k: v for k, v in kwargs.items() if k != "prune"}))
        return real(name, tuner, grid, *args, **kwargs)

    monkeypatch.setattr(lin_mod, "launch_tuned", record)
    w = torch.randn(16, 32)
    for m in (5, 7, 8, 9):
        x = torch.randn(m, 32)
        with set_backend("triton"):
            y = ops.linear(x, w, None, "none")
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)
    assert seen[0] == seen[1] == seen[2] != seen[3]  # M = 5, 7, 8 share bucket 8; M = 9 is bucket 16


# ------------------------------------------------------------------------------------------- attention tail
@pytest.mark.parametrize("S", [65, 1025])
def test_attention_query_tail_in_one_launch(monkeypatch, S):
    grids = []
    real = att_mod.launch_tuned

    def record(name, tuner, grid, *args, **kwargs):
        grids.append((grid, kwargs["BLOCK_M"], kwargs["TAIL_M"]))
        return real(name, tuner, grid, *args, **kwargs)

    monkeypatch.setattr(att_mod, "launch_tuned", record)
    H, D = 1, 64
    q, k, v = (torch.randn(1, S, H, D) for _ in range(3))
    if S == 1025:  # the full parity at 1025 lives in tests/test_attention.py; here only the launch shape
        k, v = k[:, :33], v[:, :33]
    before = ops.launches("attention")
    with set_backend("triton"), ops.poison_outputs():
        out = ops.attention(q, k, v, D ** -0.5)
    assert ops.launches("attention") - before == 1
    (grid, bm, tail_m), = grids
    assert grid == (S // bm + 1, H) and tail_m == 16  # full tiles + one small-tile program, one launch
    ref = F.attention(q, k, v, D ** -0.5)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
