"""Timing and results files of the benchmark harness (used by bench/conftest.py; unit-tested by
tests/test_bench_harness.py).

Timing (:func:`measure`):

* CUDA: :func:`time_events` — CUDA events around back-to-back calls, as ``triton.testing.do_bench`` does: one warm
  call, an estimate over 5 calls, warm-up for ``warmup_ms``, then enough repetitions for ``rep_ms``.

  - ``flush_l2=True`` (memory-bound rows): the L2 cache is overwritten (a 256 MB ``zero_``) before every timed call,
    one event pair per call. The flush kernel also lets the CPU queue the call before the GPU reaches it.
  - ``flush_l2=False`` (compute-bound rows): rounds of ``k`` back-to-back calls between one event pair; before each
    round the GPU spins (``torch.cuda._sleep``) for longer than the CPU needs to queue the ``k`` calls, so the events
    time the kernels, not the Python that launches them.

  The Python call overhead is timed separately (:func:`host_loop`): the host time of one call (argument checks,
  custom-op dispatch, launch) in a loop that does not wait for the GPU; ``wall_call_s`` is one call plus a
  synchronize, as a single eager call costs.
* CPU: the same statistics from ``time.perf_counter`` around each call (kernel time = wall time; no overhead split).

Results (:func:`build_results`, :func:`write_results`): one JSON + one Markdown file per run with the device,
versions, ceilings measured in the run, and per row the shapes, median, GB/s / TFLOP/s, their fraction of the
ceilings and the speedup over the fastest baseline row (eager, SDPA, cuBLAS …) of the same group and shapes.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import statistics
import time
from typing import Callable, Iterable, Optional

# rows whose impl label starts with one of these are baselines (the things the kernels must beat)
BASELINE_PREFIXES = ("eager", "sdpa", "torch.", "cublas", "generate-bf16")


def is_baseline(impl: Optional[str]) -> bool:
    return bool(impl) and str(impl).startswith(BASELINE_PREFIXES)


def _quantile(sorted_vals: list, q: float) -> float:
    if not sorted_vals:
        return float("nan")
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize(per_call_s: list) -> dict:
    """Median / min / 20th / 80th percentile of per-call times (seconds)."""
    if not per_call_s:
        raise ValueError("summarize: no timings")
    if any(not (t >= 0) or math.isinf(t) for t in per_call_s):
        raise ValueError(f"summarize: invalid timing in {per_call_s[:8]}")
    v = sorted(per_call_s)
    return {"median_s": statistics.median(v), "min_s": v[0], "p20_s": _quantile(v, 0.2), "p80_s": _quantile(v, 0.8),
            "n": len(v)}


# ----------------------------------------------------------------------------------------------------- timing
def time_events(fn: Callable, *, event: Callable, synchronize: Callable, flush: Optional[Callable] = None,
                spin: Optional[Callable[[float], None]] = None, host_call_s: float = 0.0, warmup_ms: float = 25.0,
                rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000) -> list:
    """Per-call seconds of ``fn`` measured with device events (``event()`` → object with ``record()`` and
    ``elapsed_time(end)`` in ms, as ``torch.cuda.Event(enable_timing=True)``).

    ``flush`` (called before every timed call, one event pair per call) is the L2 flush of memory-bound rows.
    Without it, calls run in rounds of ``k`` between one event pair; ``spin(seconds)`` keeps the device busy before
    each round so that the host (``host_call_s`` per call) can queue the ``k`` calls ahead of it.
    """
    fn()
    synchronize()
    # estimate
    s, e = event(), event()
    s.record()
    for _ in range(5):
        if flush is not None:
            flush()
        fn()
    e.record()
    synchronize()
    est_ms = max(s.elapsed_time(e) / 5, 1e-4)
    n_warmup = max(1, int(warmup_ms / est_ms))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / est_ms)))
    for _ in range(n_warmup):
        fn()
    times = []
    if flush is not None:
        starts = [event() for _ in range(n_rep)]
        ends = [event() for _ in range(n_rep)]
        for i in range(n_rep):
            flush()
            starts[i].record()
            fn()
            ends[i].record()
        synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)]
    else:
        k = max(1, min(n_rep // min_reps, 100)) if n_rep >= min_reps else 1
        rounds = max(1, n_rep // k)
        for _ in range(rounds):
            if spin is not None:
                # device busy while the host queues the round: 1.5x the measured host time of k calls (+ 20 us)
                spin(min(0.05, 1.5 * k * host_call_s + 2e-5))
            a, b = event(), event()
            a.record()
            for _ in range(k):
                fn()
            b.record()
            times.append((a, b, k))
        synchronize()
        times = [a.elapsed_time(b) / 1e3 / k for a, b, k in times]
    return times


def host_loop(fn: Callable, *, n: int = 20, synchronize: Callable = lambda: None,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Host seconds per call of ``fn`` over ``n`` calls that do not wait for the device (the Python overhead)."""
    synchronize()
    t0 = clock()
    for _ in range(n):
        fn()
    t1 = clock()
    synchronize()
    return (t1 - t0) / n


def time_host(fn: Callable, *, reps: int, warmup: int = 1, synchronize: Callable = lambda: None,
              clock: Callable[[], float] = time.perf_counter) -> list:
    """Per-call wall seconds (one call + ``synchronize`` each)."""
    for _ in range(warmup):
        fn()
    synchronize()
    out = []
    for _ in range(reps):
        t0 = clock()
        fn()
        synchronize()
        out.append(clock() - t0)
    return out


class L2Flusher:
    """Overwrites the GPU's L2 cache (a 256 MB buffer zeroed, as triton.testing does) before a timed call."""

    def __init__(self, device, nbytes: int = 256 << 20):
        import torch

        self.buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buf.zero_()


def cuda_spin(device, cycles_per_s: float = 2.0e9):
    """``spin(seconds)``: keep ``device`` busy for at least about that long (``torch.cuda._sleep`` of clock cycles;
    ``cycles_per_s`` is an upper bound of the SM clock, so the spin is never shorter than asked)."""
    import torch

    def spin(seconds: float):
        with torch.cuda.device(device):
            torch.cuda._sleep(max(1, int(seconds * cycles_per_s)))

    return spin


def measure(fn: Callable, device, *, flush_l2: bool = False, quick: bool = False, reps: Optional[int] = None) -> dict:
    """Time ``fn`` on ``device``: ``{"median_s", "min_s", "p20_s", "p80_s", "n", "method", "l2_flushed",
    "host_call_s", "wall_call_s", "times_s"}`` (see the module docstring)."""
    dev_type = getattr(device, "type", str(device))
    if dev_type == "cuda":
        import torch

        sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
        first = time_host(fn, reps=1, warmup=1, synchronize=sync)[0]
        n_host = max(1, min(3 if quick else 20, int(0.05 / max(first, 1e-9))))  # ≤ ~50 ms of host timing
        host_s = host_loop(fn, n=n_host, synchronize=sync)
        wall = summarize(time_host(fn, reps=min(n_host, 5), warmup=0, synchronize=sync))["median_s"]
        flush = L2Flusher(device) if flush_l2 else None
        with torch.cuda.device(device):
            times = time_events(fn, event=lambda: torch.cuda.Event(enable_timing=True), synchronize=sync,
                                flush=flush, spin=cuda_spin(device), host_call_s=host_s,
                                warmup_ms=2 if quick else 25, rep_ms=5 if quick else 100,
                                min_reps=2 if quick else (reps or 10), max_reps=20 if quick else 1000)
        out = summarize(times)
        out.update(method="cuda-events", l2_flushed=bool(flush_l2), host_call_s=host_s, wall_call_s=wall)
    else:
        fn()  # warm-up / compile outside the measurement
        times = time_host(fn, reps=2 if quick else (reps or 5), warmup=0 if quick else 1)
        out = summarize(times)
        out.update(method="host-wall", l2_flushed=False, host_call_s=None, wall_call_s=out["median_s"])
    out["times_s"] = times
    return out


# ---------------------------------------------------------------------------------------------------- results
def _match_key(row: dict) -> tuple:
    shapes = row.get("shapes") or {}
    keys = row.get("match") or sorted(shapes)
    return (row.get("group"), row.get("dtype"), bool(row.get("l2_flushed")), tuple((k, json.dumps(shapes.get(k), sort_keys=True)) for k in keys))


def add_speedups(rows: list) -> list:
    """For every non-baseline row: ``speedup_vs_best_baseline`` = fastest matching baseline median / row median.

    A baseline matches when it is in the same group, has the same dtype, was timed the same way (L2 flushed or not)
    and agrees on the row's ``match`` shape keys
    (default: all of the row's shape keys). ``meets_target`` is set where the row has a ``target_speedup``.
    """
    for r in rows:
        if r.get("baseline") or not r.get("median_s"):
            continue
        key = _match_key(r)
        cands = [b for b in rows if b.get("baseline") and b.get("median_s") and _match_key({**b, "match":
                 r.get("match") or sorted(r.get("shapes") or {})}) == key]
        if not cands:
            continue
        best = min(cands, key=lambda b: b["median_s"])
        r["best_baseline"] = best["impl"]
        r["best_baseline_median_s"] = best["median_s"]
        r["speedup_vs_best_baseline"] = round(best["median_s"] / r["median_s"], 3)
        if r.get("target_speedup") is not None:
            r["meets_target"] = bool(r["speedup_vs_best_baseline"] >= r["target_speedup"])
    return rows


def derived_rates(row: dict, ceilings: dict) -> dict:
    """GB/s and TFLOP/s from the median, and their fraction of the run's copy-bandwidth / matmul ceilings."""
    out = {}
    med = row.get("median_s")
    if not med:
        return out
    if row.get("bytes_moved") is not None:
        gbps = row["bytes_moved"] / med / 1e9
        out["gbps"] = round(gbps, 2)
        if ceilings.get("copy_gbps"):
            out["frac_copy_bw"] = round(gbps / ceilings["copy_gbps"], 3)
    if row.get("flops") is not None:
        tflops = row["flops"] / med / 1e12
        out["tflops"] = round(tflops, 4)
        if ceilings.get("matmul_tflops"):
            out["frac_matmul_peak"] = round(tflops / ceilings["matmul_tflops"], 3)
    return out


def build_results(rows: Iterable[dict], *, env: dict, ceilings: dict) -> dict:
    """The results document: ``{"env", "ceilings", "rows"}``; rows get rates, fractions and speedups."""
    out_rows = []
    for r in rows:
        r = dict(r)
        r.pop("times_s", None)
        r.update(derived_rates(r, ceilings))
        out_rows.append(r)
    add_speedups(out_rows)
    return {"env": dict(env), "ceilings": dict(ceilings), "rows": out_rows}


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def _fmt(v, unit_scale=1.0, digits=2):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v * unit_scale:.{digits}f}"
    return str(v)


def render_markdown(doc: dict) -> str:
    env, ceil = doc["env"], doc["ceilings"]
    lines = [f"# Benchmark results: {env.get('device')}", ""]
    lines.append(" | ".join(f"{k} {env[k]}" for k in ("torch", "cuda", "triton", "date") if k in env))
    lines.append("")
    lines.append(f"Ceilings measured in this run: copy {_fmt(ceil.get('copy_gbps'))} GB/s (read + write), "
                 f"matmul {_fmt(ceil.get('matmul_tflops'), digits=3)} TFLOP/s ({ceil.get('matmul_dtype')}). "
                 f"Timing: {env.get('timing', '-')}.")
    lines.append("")
    groups: dict = {}
    for r in doc["rows"]:
        groups.setdefault(r.get("group") or "-", []).append(r)
    head = ("| benchmark | impl | dtype | shapes | median µs | overhead µs | GB/s | % copy | TFLOP/s | % mm | "
            "speedup vs best baseline |")
    for g, rs in groups.items():
        lines += [f"## {g}", "", head, "|" + "---|" * 11]
        for r in rs:
            shapes = ", ".join(f"{k}={v}" for k, v in (r.get("shapes") or {}).items())
            sp = "baseline" if r.get("baseline") else (
                f"{r['speedup_vs_best_baseline']:.2f}× vs {r['best_baseline']}" if r.get("best_baseline") else "-")
            if r.get("meets_target") is not None:
                sp += f" (target {r['target_speedup']}×: {'met' if r['meets_target'] else 'missed'})"
            lines.append(
                f"| {r.get('name')} | {r.get('impl')} | {r.get('dtype')} | {shapes} | {_fmt(r.get('median_s'), 1e6)} | "
                f"{_fmt(r.get('host_call_s'), 1e6)} | {_fmt(r.get('gbps'))} | {_fmt(r.get('frac_copy_bw'), 100, 1)} | "
                f"{_fmt(r.get('tflops'), digits=3)} | {_fmt(r.get('frac_matmul_peak'), 100, 1)} | {sp} |")
        lines.append("")
    return "\n".join(lines)


def write_results(doc: dict, out_dir: str, *, date: Optional[str] = None) -> tuple[str, str]:
    """Write ``<out_dir>/<gpu>-<date>.json`` and ``.md`` (a ``-2``, ``-3`` … suffix when a file of that name exists);
    return both paths."""
    os.makedirs(out_dir, exist_ok=True)
    date = date or _dt.date.today().isoformat()
    base = f"{slug(doc['env'].get('device', 'unknown'))}-{date}"
    stem, i = base, 1
    while os.path.exists(os.path.join(out_dir, stem + ".json")) or os.path.exists(os.path.join(out_dir, stem + ".md")):
        i += 1
        stem = f"{base}-{i}"
    pj, pm = os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")
    with open(pj, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True, default=str)
    with open(pm, "w") as f:
        f.write(render_markdown(doc))
    return pj, pm
