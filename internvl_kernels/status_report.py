"""What runs on this machine: versions, the CUDA extension, and which backend each op uses and why.

:func:`status` returns it as a dict; ``python -m internvl_kernels`` prints it (``--json`` for the dict,
``--require-cuda-ext`` to exit non-zero unless the CUDA extension is loaded and registered every op).
"""
from __future__ import annotations

import importlib.util
import platform

__all__ = ["status", "format_status", "cuda_extension_problem"]


def _gpus() -> list[dict]:
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                    "memory_gib": round(p.total_memory / 2 ** 30, 1)})
    return out


def _triton_version() -> str | None:
    try:
        import triton
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return getattr(triton, "__version__", "unknown")


def status(device=None) -> dict:
    """The status report as a dict.

    ``device`` (default: ``cuda`` when a GPU is visible, else ``cpu``) is where the per-op choice is evaluated:
    ``ops[op]["backend"]`` is the implementation a call on tensors there runs first, ``ops[op]["candidates"]``
    every implementation in priority order with ``ok`` and the reason (an implementation with ``can_implement``
    may still hand particular calls on — e.g. the CUDA ``quant_matmul`` above 16 rows; ``ops[op]["handed_on"]``
    lists the reasons seen so far in this process)."""
    import torch

    from . import _backend, ops
    from .ops import _cuda

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    built = importlib.util.find_spec("internvl_kernels._C") is not None
    info = _cuda.build_info()
    ext = {
        "built": built,
        "loaded": _cuda.available(),
        "reason": _cuda.unavailable_reason(),
        "build_info": info,
        "built_for_torch": info.get("torch"),
        "built_for_cuda": info.get("cuda"),
        "archs": info.get("archs") or info.get("arch"),
        "registered_ops": list(_cuda.registered()),
        "expected_ops": list(_cuda.OPS),
    }
    per_op = {}
    rejected = _backend.rejections()
    for op in ops.OPS:
        rows = _backend.candidates(op, dev)
        chosen = next(name for name, ok, _ in rows if ok)
        per_op[op] = {
            "backend": chosen,
            "candidates": [{"backend": n, "ok": ok,
                            "reason": why if n != "cuda" or op in _cuda.OPS else
                            "no CUDA kernel for this op in csrc/ (Triton / cuBLAS run it)"} for n, ok, why in rows],
            "handed_on": {b: r for (o, b), r in rejected.items() if o == op},
        }
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": _gpus(),
        "triton": _triton_version(),
        "triton_interpret": _backend.triton_interpret(),
        "backend": _backend.get_backend(),
        "device": str(dev),
        "cuda_extension": ext,
        "ops": per_op,
    }


def cuda_extension_problem(st: dict) -> str | None:
    """Why the CUDA extension is not fully usable (``None`` when it is loaded and registered every op)."""
    ext = st["cuda_extension"]
    if not ext["loaded"]:
        return ext["reason"] or "the CUDA extension is not loaded"
    missing = [op for op in ext["expected_ops"] if op not in ext["registered_ops"]]
    if missing:
        return f"the CUDA extension did not register {missing}"
    return None


def format_status(st: dict) -> str:
    """The report as text (what ``python -m internvl_kernels`` prints)."""
    ext = st["cuda_extension"]
    gpus = ", ".join(f"{g['name']} ({g['capability']}, {g['memory_gib']} GiB)" for g in st["gpus"]) or "none"
    lines = [
        f"internvl_kernels  python {st['python']}  torch {st['torch']} (CUDA {st['torch_cuda'] or 'none'})  "
        f"triton {st['triton'] or 'not installed'}{'  TRITON_INTERPRET=1' if st['triton_interpret'] else ''}",
        f"GPU: {gpus}",
        f"backend selection: {st['backend']}  (ops evaluated for {st['device']} tensors)",
    ]
    if ext["loaded"]:
        lines.append(f"CUDA extension: loaded; built for torch {ext['built_for_torch']}, CUDA {ext['built_for_cuda']}, "
                     f"archs {ext['archs'] or 'not recorded in its build info'}; registered "
                     f"{len(ext['registered_ops'])}/{len(ext['expected_ops'])} ops")
    else:
        lines.append(f"CUDA extension: {'built but not used' if ext['built'] else 'not built'}: {ext['reason']}")
    lines.append("ops:")
    width = max(len(op) for op in st["ops"])
    for op, d in st["ops"].items():
        lines.append(f"  {op:<{width}}  -> {d['backend']}")
        for c in d["candidates"]:
            mark = "*" if c["backend"] == d["backend"] else ("+" if c["ok"] else "-")
            lines.append(f"  {'':<{width}}     {mark} {c['backend']:<6} {c['reason']}")
        for b, why in d["handed_on"].items():
            lines.append(f"  {'':<{width}}     ! {b:<6} handed a call on: {why}")
    lines.append("(* runs, + usable below it, - not usable; per-call conditions: internvl_kernels._backend.explain)")
    return "\n".join(lines)
