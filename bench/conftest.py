"""Benchmark harness: ``pytest bench/ --benchmark-only``.

Fixtures:
* ``bench_device``  — ``cuda`` when present, else ``cpu``.
* ``full_shapes``   — True on a GPU (full InternViT-6B shapes: 13 tiles × 1025 tokens); on CPU reduced shapes unless
  ``INTERNVL_BENCH_FULL=1``.
* ``ceilings``      — measured once per session on the same device: device-to-device copy bandwidth (GB/s, counting
  read + write) and a large matmul's throughput (TFLOP/s; bf16 on GPU, fp32 on CPU). Every row reports its fraction.
* ``bench_run(fn, *args, flops=None, bytes_moved=None, shapes=None, dtype=None, impl=None, rounds=None,
  flush_l2=None, baseline=None, match=None, target_speedup=None, **kwargs)`` — times ``fn(*args, **kwargs)`` with
  :func:`_harness.measure`: on CUDA with CUDA events over many back-to-back calls (``triton.testing.do_bench``
  style; ``flush_l2`` — default: memory-bound rows, i.e. ``bytes_moved`` without ``flops`` — overwrites the L2
  before each call), plus the Python call overhead timed separately on the host; on CPU the wall clock. The per-call
  times become pytest-benchmark's rounds. ``extra_info`` gets shapes, dtype, impl, device, versions, median /
  percentiles, overhead, GB/s and/or TFLOP/s and the fraction of the ceilings. ``baseline`` (default: impl starts
  with eager / sdpa / torch. / cublas) marks the rows the others are compared with; ``match`` names the shape keys
  a baseline must share (default: all); ``target_speedup`` records the row's target over the best baseline.

After the run: a roofline table with the speedup of every row over the fastest matching baseline, and the results
files ``bench/results/<gpu>-<date>.json`` + ``.md`` (on a GPU; elsewhere when ``INTERNVL_BENCH_RESULTS=<dir>``).

``INTERNVL_BENCH_QUICK=1`` (CI) runs each row for a couple of rounds only, so bench/ can't rot.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch
from _harness import build_results, derived_rates, is_baseline, measure, write_results

HAS_CUDA = torch.cuda.is_available()  # TRITON_INTERPRET / GPU-only skips: see the root conftest.py

QUICK = os.environ.get("INTERNVL_BENCH_QUICK", "0") not in ("", "0")
# results files: bench/results/ on a GPU; elsewhere only when INTERNVL_BENCH_RESULTS names a folder
RESULTS_DIR = os.environ.get("INTERNVL_BENCH_RESULTS") or (
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "results") if HAS_CUDA else None)

_SESSION: dict = {"rows": [], "ceilings": None}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def _versions() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda or "none"}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = "none"
    return info


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def full_shapes(bench_device):
    return bench_device.type == "cuda" or os.environ.get("INTERNVL_BENCH_FULL", "0") not in ("", "0")


@pytest.fixture(scope="session")
def ceilings(bench_device):
    """Copy bandwidth and matmul throughput measured on this device in this run (timed like every row)."""
    dev = bench_device
    if dev.type == "cuda":
        nbytes, n, mm_dtype = 1 << 30, 8192, torch.bfloat16
    else:
        nbytes, n, mm_dtype = 1 << 26, 2048, torch.float32
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), dev, quick=QUICK)["median_s"]
    a = torch.randn(n, n, device=dev, dtype=mm_dtype)
    b = torch.randn(n, n, device=dev, dtype=mm_dtype)
    t_mm = measure(lambda: a @ b, dev, quick=QUICK)["median_s"]
    out = {
        "copy_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "copy_bytes": nbytes,
        "matmul_n": n,
    }
    del src, dst, a, b
    _SESSION["ceilings"] = out
    return out


def _feed_pytest_benchmark(benchmark, times_s, result):
    """Give pytest-benchmark the harness's per-call times as its rounds (its table and ``benchmark.stats`` then show
    the CUDA-event kernel times on a GPU): its runner reads a clock that advances by one measured time per round."""
    clock = [0.0]
    it = iter(times_s)

    def harness_clock():
        return clock[0]

    def one_round():
        clock[0] += next(it)
        return result

    if not hasattr(benchmark, "_timer"):  # pragma: no cover - a pytest-benchmark without the attribute
        raise RuntimeError("bench/conftest.py: this pytest-benchmark version has no BenchmarkFixture._timer")
    benchmark._timer = harness_clock
    return benchmark.pedantic(one_round, rounds=len(times_s), iterations=1, warmup_rounds=0)


@pytest.fixture
def bench_run(benchmark, bench_device, ceilings):
    dev = bench_device

    def run(fn, *args, flops=None, bytes_moved=None, shapes=None, dtype=None, impl=None, rounds=None,
            flush_l2=None, baseline=None, match=None, target_speedup=None, **kwargs):
        def call():
            return fn(*args, **kwargs)

        result = call()  # warm-up / compile / autotune outside the measurement
        _sync(dev)
        flush = (bytes_moved is not None and flops is None) if flush_l2 is None else bool(flush_l2)
        m = measure(call, dev, flush_l2=flush, quick=QUICK, reps=rounds)
        _feed_pytest_benchmark(benchmark, m["times_s"], result)
        info = benchmark.extra_info
        info.update(_versions())
        info["device"] = _device_name(dev)
        info["impl"] = impl
        info["dtype"] = str(dtype).replace("torch.", "") if dtype is not None else None
        info["shapes"] = shapes
        info["ceiling_copy_gbps"] = round(ceilings["copy_gbps"], 2)
        info["ceiling_matmul_tflops"] = round(ceilings["matmul_tflops"], 3)
        for k in ("median_s", "min_s", "p20_s", "p80_s", "n", "method", "l2_flushed", "host_call_s", "wall_call_s"):
            info[k] = m[k]
        row = {"impl": impl, "dtype": info["dtype"], "shapes": shapes, "flops": flops, "bytes_moved": bytes_moved,
               "baseline": is_baseline(impl) if baseline is None else bool(baseline),
               "match": list(match) if match else None, "target_speedup": target_speedup, **m}
        rate = derived_rates(row, ceilings)
        info.update(rate)
        if target_speedup is not None:
            info["target_speedup"] = target_speedup
        _SESSION["rows"].append((benchmark, row))
        return result

    return run


def _result_rows() -> list:
    rows = []
    for bm, row in _SESSION["rows"]:
        r = {k: v for k, v in (bm.extra_info or {}).items() if not k.startswith("ceiling_")}
        r.update(row)
        r["name"] = bm.name
        r["group"] = bm.group
        rows.append(r)
    return rows


def _env(first_info: dict) -> dict:
    import datetime

    return {"device": first_info.get("device"), "torch": first_info.get("torch"), "cuda": first_info.get("cuda"),
            "triton": first_info.get("triton"), "date": datetime.date.today().isoformat(),
            "quick": QUICK, "python": platform.python_version(),
            "timing": ("CUDA events over back-to-back calls (do_bench style; L2 flushed before each call on "
                       "memory-bound rows); overhead = host time of one call" if HAS_CUDA else
                       "host wall clock per call (CPU: Triton runs in the interpreter, no kernel speeds)")}


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A roofline table after pytest-benchmark's own (kernel median, Python overhead, achieved GB/s / TFLOP/s, the
    fraction of the ceilings, speedup over the best baseline) and, on a GPU, the results files."""
    rows = _result_rows()
    if not rows or _SESSION["ceilings"] is None:
        return
    doc = build_results(rows, env=_env(rows[0]), ceilings=_SESSION["ceilings"])
    e, c = doc["env"], doc["ceilings"]
    tr = terminalreporter
    tr.write_sep("-", "roofline (ceilings measured in this run)")
    tr.write_line(f"device: {e['device']} | torch {e['torch']} | triton {e['triton']} | cuda {e['cuda']} | "
                  f"copy {c['copy_gbps']:.2f} GB/s | matmul {c['matmul_tflops']:.3f} TFLOP/s | timing: {e['timing']}")
    head = (f"{'benchmark':<52} {'impl':<18} {'dtype':<9} {'median us':>10} {'ovh us':>8} {'GB/s':>9} {'%copy':>6} "
            f"{'TFLOP/s':>9} {'%mm':>6} {'vs best base':>12}")
    tr.write_line(head)

    def fmt(v, scale=1.0, digits=2):
        return "-" if v is None else f"{v * scale:.{digits}f}"

    for r in doc["rows"]:
        sp = "base" if r.get("baseline") else fmt(r.get("speedup_vs_best_baseline"), digits=2) + (
            "x" if r.get("speedup_vs_best_baseline") is not None else "")
        tr.write_line(
            f"{r['name'][:52]:<52} {str(r.get('impl'))[:18]:<18} {str(r.get('dtype'))[:9]:<9} "
            f"{fmt(r.get('median_s'), 1e6, 1):>10} {fmt(r.get('host_call_s'), 1e6, 1):>8} {fmt(r.get('gbps')):>9} "
            f"{fmt(r.get('frac_copy_bw'), 100, 1):>6} {fmt(r.get('tflops'), 1, 3):>9} "
            f"{fmt(r.get('frac_matmul_peak'), 100, 1):>6} {sp:>12}")
    if RESULTS_DIR:
        pj, pm = write_results(doc, RESULTS_DIR)
        tr.write_line(f"results written: {pj} and {pm}")
