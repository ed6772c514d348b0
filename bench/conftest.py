"""Benchmark harness: ``pytest bench/ --benchmark-only``.

Fixtures:
* ``bench_device``  — ``cuda`` when present, else ``cpu``.
* ``full_shapes``   — True on a GPU (full InternViT-6B shapes: 13 tiles × 1025 tokens); on CPU reduced shapes unless
  ``INTERNVL_BENCH_FULL=1``.
* ``ceilings``      — measured once per session on the same device: device-to-device copy bandwidth (GB/s, counting
  read + write) and a large matmul's throughput (TFLOP/s; bf16 on GPU, fp32 on CPU). Every row reports its fraction.
* ``bench_run(fn, *args, flops=None, bytes_moved=None, shapes=None, dtype=None, impl=None, **kwargs)`` — times ``fn``
  with pytest-benchmark (CUDA synchronized inside the timed call) and records in ``extra_info``: shapes, dtype, impl,
  device name, torch / triton / CUDA versions, achieved GB/s and/or TFLOP/s and the fraction of the ceiling.

``INTERNVL_BENCH_QUICK=1`` (CI) runs each row for a couple of rounds only, so bench/ can't rot.
"""
from __future__ import annotations

import os
import platform
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()  # TRITON_INTERPRET / GPU-only skips: see the root conftest.py

QUICK = os.environ.get("INTERNVL_BENCH_QUICK", "0") not in ("", "0")


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


def _median_time(fn, device, warmup=3, iters=10) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


@pytest.fixture(scope="session")
def bench_device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def full_shapes(bench_device):
    return bench_device.type == "cuda" or os.environ.get("INTERNVL_BENCH_FULL", "0") not in ("", "0")


@pytest.fixture(scope="session")
def ceilings(bench_device):
    """Copy bandwidth and matmul throughput measured on this device in this run."""
    dev = bench_device
    if dev.type == "cuda":
        nbytes, n, mm_dtype = 1 << 30, 8192, torch.bfloat16
    else:
        nbytes, n, mm_dtype = 1 << 26, 2048, torch.float32
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t_copy = _median_time(lambda: dst.copy_(src), dev, iters=3 if QUICK else 10)
    a = torch.randn(n, n, device=dev, dtype=mm_dtype)
    b = torch.randn(n, n, device=dev, dtype=mm_dtype)
    t_mm = _median_time(lambda: a @ b, dev, iters=3 if QUICK else 10)
    out = {
        "copy_gbps": 2 * nbytes / t_copy / 1e9,
        "matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "copy_bytes": nbytes,
        "matmul_n": n,
    }
    del src, dst, a, b
    return out


@pytest.fixture
def bench_run(benchmark, bench_device, ceilings):
    dev = bench_device

    def run(fn, *args, flops=None, bytes_moved=None, shapes=None, dtype=None, impl=None, rounds=None, **kwargs):
        def timed():
            out = fn(*args, **kwargs)
            _sync(dev)
            return out

        timed()  # warm-up / compile outside the measurement
        if QUICK:
            n_rounds, warmup = 2, 0
        else:
            n_rounds, warmup = (rounds or (20 if dev.type == "cuda" else 5)), 1
        result = benchmark.pedantic(timed, rounds=n_rounds, iterations=1, warmup_rounds=warmup)
        median = benchmark.stats.stats.median
        info = benchmark.extra_info
        info.update(_versions())
        info["device"] = _device_name(dev)
        info["impl"] = impl
        info["dtype"] = str(dtype).replace("torch.", "") if dtype is not None else None
        info["shapes"] = shapes
        info["ceiling_copy_gbps"] = round(ceilings["copy_gbps"], 2)
        info["ceiling_matmul_tflops"] = round(ceilings["matmul_tflops"], 3)
        if bytes_moved is not None:
            gbps = bytes_moved / median / 1e9
            info["gbps"] = round(gbps, 2)
            info["frac_copy_bw"] = round(gbps / ceilings["copy_gbps"], 3)
        if flops is not None:
            tflops = flops / median / 1e12
            info["tflops"] = round(tflops, 4)
            info["frac_matmul_peak"] = round(tflops / ceilings["matmul_tflops"], 3)
        return result

    return run


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """A roofline table after pytest-benchmark's own: achieved GB/s / TFLOP/s and the fraction of the ceiling."""
    bs = getattr(config, "_benchmarksession", None)
    rows = [b for b in (getattr(bs, "benchmarks", None) or []) if getattr(b, "extra_info", None)]
    if not rows:
        return
    first = rows[0].extra_info
    tr = terminalreporter
    tr.write_sep("-", "roofline (ceilings measured in this run)")
    tr.write_line(
        f"device: {first.get('device')} | torch {first.get('torch')} | triton {first.get('triton')} | "
        f"cuda {first.get('cuda')} | copy {first.get('ceiling_copy_gbps')} GB/s | "
        f"matmul {first.get('ceiling_matmul_tflops')} TFLOP/s"
    )
    head = f"{'benchmark':<58} {'impl':<10} {'dtype':<9} {'median ms':>10} {'GB/s':>9} {'%copy':>6} {'TFLOP/s':>9} {'%mm':>6}"
    tr.write_line(head)
    for b in rows:
        e = b.extra_info
        med = b.stats.median * 1e3 if hasattr(b.stats, "median") else float("nan")

        def fmt(v, pct=False):
            if v is None:
                return "-"
            return f"{100 * v:.1f}" if pct else f"{v:.2f}" if v >= 0.01 else f"{v:.4f}"

        tr.write_line(
            f"{b.name[:58]:<58} {str(e.get('impl'))[:10]:<10} {str(e.get('dtype'))[:9]:<9} {med:>10.3f} "
            f"{fmt(e.get('gbps')):>9} {fmt(e.get('frac_copy_bw'), True):>6} {fmt(e.get('tflops')):>9} "
            f"{fmt(e.get('frac_matmul_peak'), True):>6}"
        )
