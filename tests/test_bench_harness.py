"""The benchmark harness (bench/_harness.py) on the CPU: the do_bench-style event timing against a fake device
clock, the host timing of a CPU callable, and the results JSON / Markdown written from a synthetic benchmark list
(rates, fractions of the ceilings, speedup over the best matching baseline)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import _harness as H  # noqa: E402


class FakeDevice:
    """A device whose queue runs kernels of known durations; events read the device clock when they execute."""

    def __init__(self):
        self.t = 0.0  # device clock, seconds
        self.log = []

    def launch(self, seconds, what="kernel"):
        self.t += seconds
        self.log.append(what)

    def event(self):
        dev = self

        class Ev:
            def record(self):
                self.t = dev.t
                dev.log.append("event")

            def elapsed_time(self, other):
                return (other.t - self.t) * 1e3  # ms, like torch.cuda.Event

        return Ev()


def test_time_events_back_to_back_rounds():
    dev = FakeDevice()
    spins = []
    times = H.time_events(lambda: dev.launch(20e-6), event=dev.event, synchronize=lambda: None,
                          spin=lambda s: (spins.append(s), dev.launch(s, "spin")), host_call_s=5e-6,
                          warmup_ms=1, rep_ms=10, min_reps=10, max_reps=1000)
    # 10 ms / 20 us = 500 reps -> 10 rounds of 50 back-to-back calls, each round after a spin
    assert len(times) == 10 and len(spins) == 10
    assert all(abs(t - 20e-6) < 1e-12 for t in times)
    assert all(s >= 1.5 * 50 * 5e-6 for s in spins)  # the spin outlasts the host's queuing of a round
    round_log = ["spin", "event"] + ["kernel"] * 50 + ["event"]
    assert dev.log[-10 * len(round_log):] == round_log * 10  # spin, then 50 calls between one event pair


def test_time_events_flush_between_calls():
    dev = FakeDevice()
    flushes = []
    times = H.time_events(lambda: dev.launch(1e-3), event=dev.event, synchronize=lambda: None,
                          flush=lambda: (flushes.append(1), dev.launch(50e-6, "flush")), warmup_ms=1, rep_ms=20,
                          min_reps=10)
    # estimate includes the flushes (1.05 ms/call) -> int(20 / 1.05) = 19 timed calls, one event pair each
    assert len(times) == 19
    assert all(abs(t - 1e-3) < 1e-12 for t in times)  # the flush is outside every timed call
    assert len(flushes) == 5 + 19  # before each estimate call and each timed call


def test_time_events_min_and_max_reps():
    dev = FakeDevice()
    slow = H.time_events(lambda: dev.launch(0.5), event=dev.event, synchronize=lambda: None, rep_ms=100,
                         min_reps=3)
    assert len(slow) == 3 and all(abs(t - 0.5) < 1e-9 for t in slow)
    fast = H.time_events(lambda: dev.launch(1e-7), event=dev.event, synchronize=lambda: None, rep_ms=100,
                         max_reps=200, min_reps=10)
    assert sum(1 for _ in fast) * 20 == 200 and all(abs(t - 1e-7) < 1e-12 for t in fast)


def test_host_loop_and_time_host_fake_clock():
    clock = [0.0]
    syncs = []

    def fn():
        clock[0] += 2e-6

    assert H.host_loop(fn, n=10, synchronize=lambda: syncs.append(1), clock=lambda: clock[0]) == pytest.approx(2e-6)
    assert len(syncs) == 2
    per_call = H.time_host(fn, reps=4, warmup=1, clock=lambda: clock[0])
    assert per_call == pytest.approx([2e-6] * 4)


def test_measure_cpu_callable():
    import time

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)

    m = H.measure(fn, "cpu", reps=5)
    assert m["method"] == "host-wall" and m["n"] == 5 and len(m["times_s"]) == 5
    assert 0.002 <= m["median_s"] < 0.5 and m["min_s"] <= m["median_s"] <= m["p80_s"]
    assert len(calls) == 1 + 1 + 5  # warm call, warm-up, 5 timed


def test_summarize_rejects_bad_timings():
    with pytest.raises(ValueError, match="no timings"):
        H.summarize([])
    with pytest.raises(ValueError, match="invalid timing"):
        H.summarize([1.0, float("nan")])
    s = H.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert s["median_s"] == 3.0 and s["min_s"] == 1.0 and s["p20_s"] == pytest.approx(1.8)


def _rows():
    base = {"group": "rms_norm", "dtype": "bfloat16", "l2_flushed": True, "bytes_moved": 2e9}
    shp = {"tiles": 13, "seq": 1025, "hidden": 3200}
    return [
        {**base, "name": "eager", "impl": "eager", "baseline": True, "shapes": shp, "median_s": 4e-3},
        {**base, "name": "compiled", "impl": "torch.compile", "baseline": True, "shapes": shp, "median_s": 2.5e-3},
        {**base, "name": "triton", "impl": "triton", "baseline": False, "shapes": shp, "median_s": 1e-3,
         "host_call_s": 12e-6, "times_s": [1e-3]},
        {**base, "name": "other-shape", "impl": "triton", "baseline": False, "shapes": {**shp, "hidden": 12800},
         "median_s": 1e-3},
        {**base, "name": "not-flushed", "impl": "triton", "baseline": False, "shapes": shp, "median_s": 1e-3,
         "l2_flushed": False},
        {"group": "qmm", "dtype": "bfloat16", "l2_flushed": True, "name": "w4", "impl": "triton-gptq-w4",
         "baseline": False, "shapes": {"M": 1, "K": 5120, "N": 13824, "bits": 4}, "match": ["M", "K", "N"],
         "median_s": 20e-6, "target_speedup": 3.0, "flops": 2 * 5120 * 13824},
        {"group": "qmm", "dtype": "bfloat16", "l2_flushed": True, "name": "bf16", "impl": "torch.matmul-bf16",
         "baseline": True, "shapes": {"M": 1, "K": 5120, "N": 13824}, "median_s": 50e-6},
    ]


def test_build_results_rates_and_speedups():
    doc = H.build_results(_rows(), env={"device": "NVIDIA H200"}, ceilings={"copy_gbps": 4000.0,
                                                                              "matmul_tflops": 800.0})
    rows = {r["name"]: r for r in doc["rows"]}
    t = rows["triton"]
    assert t["gbps"] == 2000.0 and t["frac_copy_bw"] == 0.5
    assert t["best_baseline"] == "torch.compile" and t["speedup_vs_best_baseline"] == 2.5  # fastest baseline
    assert "times_s" not in t
    assert "speedup_vs_best_baseline" not in rows["other-shape"]  # no baseline of that shape
    assert "speedup_vs_best_baseline" not in rows["not-flushed"]  # timed differently from the baselines
    assert "speedup_vs_best_baseline" not in rows["eager"]
    w4 = rows["w4"]
    assert w4["best_baseline"] == "torch.matmul-bf16" and w4["speedup_vs_best_baseline"] == 2.5
    assert w4["meets_target"] is False
    assert w4["tflops"] == pytest.approx(2 * 5120 * 13824 / 20e-6 / 1e12, rel=1e-3)
    assert w4["frac_matmul_peak"] == pytest.approx(w4["tflops"] / 800.0, abs=1e-3)


def test_write_results_json_and_md(tmp_path):
    env = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "triton": "3.6.0", "date": "2026-12-01"}
    doc = H.build_results(_rows(), env=env, ceilings={"copy_gbps": 4000.0, "matmul_tflops": 800.0,
                                                      "matmul_dtype": "bfloat16"})
    pj, pm = H.write_results(doc, str(tmp_path), date="2026-12-01")
    assert os.path.basename(pj) == "nvidia-h200-2026-12-01.json" and pm.endswith("nvidia-h200-2026-12-01.md")
    back = json.load(open(pj))
    assert back["env"]["device"] == "NVIDIA H200" and back["ceilings"]["copy_gbps"] == 4000.0
    assert {r["name"] for r in back["rows"]} == {r["name"] for r in _rows()}
    md = open(pm).read()
    assert "## rms_norm" in md and "## qmm" in md and "4000.00 GB/s" in md
    assert "2.50× vs torch.compile" in md and "(target 3.0×: missed)" in md
    line = next(ln for ln in md.splitlines() if ln.startswith("| triton |"))
    assert "| 1000.00 | 12.00 | 2000.00 | 50.0 |" in line  # median µs, overhead µs, GB/s, % copy
    pj2, _ = H.write_results(doc, str(tmp_path), date="2026-12-01")  # a second run the same day: new files
    assert pj2.endswith("nvidia-h200-2026-12-01-2.json") and os.path.exists(pj)


def test_is_baseline_labels():
    assert H.is_baseline("eager") and H.is_baseline("sdpa-flash") and H.is_baseline("torch.matmul-bf16")
    assert not H.is_baseline("triton") and not H.is_baseline("cuda") and not H.is_baseline(None)
