"""The CUDA kernels of csrc/, run on the CPU: every .cu is compiled as plain C++ with -DIK_EMULATION against a SIMT
emulator (csrc/test/ik_emu.h: one fiber per CUDA thread, warp-collective ldmatrix / mma.sync / shuffles modelled
from the PTX ISA, block and warp barriers, deadlock detection), with AddressSanitizer when available, and driven
through the kernels' own launchers by tests/_csrc_emu.py on CPU tensors against the eager references.

This runs the real kernel code -- index math, vector widths, masking, online softmax, the QK-norm transform, the
split-K reduction, the shared-memory pipeline -- with warps deliberately drifting apart between barriers
(IK_EMU_SCHED=skew: warp w advances every 8^(w%4)-th pass) so that a missing __syncthreads shows up as a wrong
result (checked by mutating the kernels: removing any of attention's or quant_matmul's barriers or block_sum's
trailing one fails cases), and ASan reporting out-of-bounds accesses to global and shared memory. It cannot show timing, GPU memory-ordering effects beyond barrier placement,
or the exact fp32 summation order inside the tensor cores. Needs g++ and the CUDA headers (nvcc's include dir);
skips with a reason otherwise. ~95 s of CPU (compile ~40 s, cases ~55 s), two jobs / two shards in parallel.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _csrc_emu  # noqa: E402
from test_csrc_compile import NVCC, _cuda_include  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CXX = shutil.which("g++") or shutil.which("c++")
CUDA_INC = _cuda_include(NVCC)
SHARDS = 2


def _asan_lib() -> str | None:
    if CXX is None:
        return None
    out = subprocess.run([CXX, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return out if out and os.path.isabs(out) and os.path.exists(out) else None


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    if CUDA_INC is None or not os.path.exists(os.path.join(CUDA_INC, "cuda_fp16.h")):
        pytest.skip("CUDA headers (cuda_fp16.h) not found")
    asan = _asan_lib()
    out = tmp_path_factory.mktemp("emu")
    flags = ["-std=c++17", "-O1", "-fPIC", "-DIK_EMULATION", f"-I{CSRC}", f"-I{CUDA_INC}",
             "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
             "-D__CUDA_NO_HALF2_OPERATORS__", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-Wno-unused-function",
             "-Wno-unused-variable"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    srcs = sorted(CSRC.glob("*.cu")) + [CSRC / "test" / "emu_capi.cpp"]

    def compile_one(src):
        obj = out / (src.name + ".o")
        lang = ["-x", "c++"] if src.suffix == ".cu" else []
        proc = subprocess.run([CXX, *flags, *lang, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        return src.name, proc.returncode, proc.stderr, obj

    with concurrent.futures.ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as ex:
        results = list(ex.map(compile_one, srcs))
    for name, rc, err, _ in results:
        assert rc == 0, f"{name} does not compile under IK_EMULATION:\n{err[-4000:]}"
    lib = out / "libik_emu.so"
    link = [CXX, "-shared", *(["-fsanitize=address"] if asan else []), "-o", str(lib), *(str(r[3]) for r in results)]
    proc = subprocess.run(link, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return lib, asan


@pytest.fixture(scope="module")
def emu_results(emu_lib):
    lib, asan = emu_lib
    env = dict(os.environ, IK_EMU_SCHED="skew", PYTHONPATH=str(ROOT))
    if asan:
        env["LD_PRELOAD"] = asan
        env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).parent / "_csrc_emu.py"), str(lib),
                               f"--shard={i}/{SHARDS}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for i in range(SHARDS)]
    results, errors = {}, []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        for line in out.splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[r["case"]] = r
        noise = [ln for ln in err.splitlines() if "swapcontext" not in ln and ln.strip()]
        if p.returncode != 0 or any("AddressSanitizer" in ln or "ik_emu:" in ln for ln in noise):
            errors.append(f"driver exit {p.returncode}:\n" + "\n".join(noise[-60:]))
    return results, errors, bool(asan)


def test_driver_clean(emu_results):
    """No sanitizer report, no emulator abort (misaligned access, deadlock, __trap), no crash."""
    _, errors, _ = emu_results
    assert not errors, "\n\n".join(errors)


@pytest.mark.parametrize("case", list(_csrc_emu.CASES))
def test_kernel_emulated(emu_results, case):
    results, errors, _ = emu_results
    r = results.get(case)
    assert r is not None, "no result for this case (the driver crashed before it):\n" + "\n".join(errors)[-3000:]
    assert r["ok"], r["detail"]
