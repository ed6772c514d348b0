"""CI checks of the CUDA sources (csrc/) on a machine without a GPU.

* every ``csrc/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90a, with the flags torch's CUDAExtension adds,
  without warnings, and ptxas reports no register spills and at most 48 KiB of static shared memory for any kernel
  (skipped with a reason when nvcc is absent);
* the kernel translation units stay plain CUDA (no torch / ATen / c10 headers) -- only csrc/bindings.cpp sees torch;
* csrc/bindings.cpp passes ``-fsyntax-only`` against the installed (CPU) torch's headers plus the CUDA headers
  (the CPU wheel lacks one generated header, c10/cuda/impl/cuda_cmake_macros.h, which the test supplies), with the
  C++ standard torch's build adds (setup.py passes none; torch >= 2.14 headers need C++20);
* csrc/test/host_layout_test.cpp (plain C++, no nvcc needed) emulates ldmatrix / mma.sync from the PTX ISA and drives
  them with the kernels' own index maps (csrc/ik_layout.h): attention's Q K^T / P V / epilogue and quant_matmul's
  permuted-k fragments must give exact products, shared-memory writes must cover each slot once and ldmatrix phases
  must be bank-conflict-free; the pixel-shuffle gather map must equal the eager reference's permutation.

The nvcc compiles run in parallel (one job per file, both archs in it): ~70 s of CPU in all (6 files x 2 archs
~ 55 s, bindings -fsyntax-only ~ 15 s), i.e. about 40-60 s of wall time on the 2-core CI machine.
"""
from __future__ import annotations

import concurrent.futures
import inspect
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as torch_ce

from internvl_kernels.model import functional as F_ref

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}


def torch_cxx_std() -> str:
    """The ``-std=`` flag torch's BuildExtension adds when an extension passes none (setup.py passes none): the
    newest ``c++NN`` standard its cpp_extension module names (c++20 for torch 2.13 and 2.14)."""
    found = [int(n) for n in re.findall(r"c\+\+(\d\d)\b", inspect.getsource(torch_ce))]
    newest = max((n for n in found if n < 90), default=17)  # two-digit standards: 11 < 14 < 17 < 20 < 23
    return f"-std=c++{newest}"


CXX_STD = torch_cxx_std()
# what torch.utils.cpp_extension adds to every nvcc command line
TORCH_NVCC_FLAGS = [*torch_ce.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC"]
# ptxas must report no register spills (local memory) for any kernel; the table is printed by test_ptxas_report
MAX_SPILL_BYTES = 0


def _find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuda_include(nvcc: str | None) -> str | None:
    cands = []
    if nvcc:
        real = os.path.realpath(nvcc)
        cands.append(os.path.join(os.path.dirname(os.path.dirname(real)), "include"))
        # wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc "$@"`)
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            m = re.search(r"(/\S+)/bin/nvcc", text)
            if m:
                cands.append(os.path.join(m.group(1), "include"))
        except OSError:
            pass
    cands += [os.path.join(h, "include") for h in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if h]
    for c in cands:
        if os.path.exists(os.path.join(c, "cuda_runtime_api.h")):
            return c
    return None


NVCC = _find_nvcc()
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++/clang++)")


# ------------------------------------------------------------------------------------------------------ nvcc
def _compile(cu: str, out_dir: Path):
    cmd = [NVCC, "-c", CXX_STD, "-O3", "-lineinfo", *TORCH_NVCC_FLAGS, "-Xptxas", "-v"]
    for arch in ARCHS.values():
        cmd += [f"-gencode={arch}"]
    cmd += [str(CSRC / cu), "-o", str(out_dir / (cu + ".o"))]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=CSRC)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0, " ".join(cmd)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    out_dir = tmp_path_factory.mktemp("nvcc")
    workers = max(1, min(len(CU_FILES), os.cpu_count() or 1))
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        futs = {cu: ex.submit(_compile, cu, out_dir) for cu in CU_FILES}
        results = {cu: f.result() for cu, f in futs.items()}
    wall = time.perf_counter() - t0
    print(f"\nnvcc: {len(CU_FILES)} files x {list(ARCHS)} in {wall:.1f} s wall ({workers} parallel jobs); "
          + ", ".join(f"{cu} {r[2]:.1f}s" for cu, r in results.items()))
    return results


def parse_ptxas(log: str):
    """``[(arch, kernel (demangled-ish), registers, spill_store_bytes, spill_load_bytes, smem_bytes)]``."""
    rows = []
    cur = None
    spill = (0, 0)
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur:
            spill = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?", line)
        if m and cur and "Used" in line:
            smem = re.search(r"(\d+) bytes smem", line)
            rows.append((cur[0], cur[1], int(m.group(1)), spill[0], spill[1], int(smem.group(1)) if smem else 0))
            cur, spill = None, (0, 0)
    return rows


def test_cxx_std_is_torchs():
    assert CXX_STD in ("-std=c++17", "-std=c++20", "-std=c++23")
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14):
        assert CXX_STD != "-std=c++17", "torch >= 2.14 headers need C++20"


def test_csrc_has_kernels():
    assert CU_FILES, "no .cu files in csrc/"
    for want in ("rms_norm.cu", "layer_norm.cu", "pixel_shuffle.cu", "mlp_projector.cu", "attention.cu",
                 "quant_matmul.cu"):
        assert want in CU_FILES


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_compiles(compiled, cu):
    rc, log, secs, cmd = compiled[cu]
    assert rc == 0, f"{cmd}\n{log}"
    warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings)
    rows = parse_ptxas(log)
    archs = {r[0] for r in rows}
    assert archs == {"sm_80", "sm_90a"}, f"ptxas did not report both archs: {archs}"


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES)
def test_ptxas_report(compiled, cu):
    rc, log, _, _ = compiled[cu]
    assert rc == 0
    rows = parse_ptxas(log)
    assert rows, "no ptxas -v output parsed"
    print(f"\n{cu}:")
    for arch, fn, regs, st, ld, smem in rows:
        short = re.sub(r"_ZN2ik\d*(?:_GLOBAL__N__\w+?_\d+_\w+?_cu_\w+?\d+)?", "", fn)[:90]
        print(f"  {arch:6s} regs={regs:3d} spill_st={st:4d} spill_ld={ld:4d} smem={smem:6d}  {short}")
        assert regs <= 255
        assert smem <= 48 * 1024, f"{fn}: static smem {smem} > 48 KiB"
        assert st <= MAX_SPILL_BYTES and ld <= MAX_SPILL_BYTES, f"{fn} ({arch}) spills {st}/{ld} bytes"


def test_kernels_are_plain_cuda():
    """Only bindings.cpp may include torch / ATen / c10 headers (CI compiles the rest without a CUDA torch)."""
    bad = []
    for p in sorted(CSRC.rglob("*")):
        if p.suffix not in (".cu", ".cuh", ".h", ".cpp") or p.name == "bindings.cpp":
            continue
        for ln in p.read_text().splitlines():
            if re.match(r"\s*#\s*include\s*[<\"](torch|ATen|c10|pybind11)/", ln):
                bad.append(f"{p.relative_to(ROOT)}: {ln.strip()}")
    assert not bad, "torch headers outside bindings.cpp:\n" + "\n".join(bad)


# -------------------------------------------------------------------------------------------- bindings.cpp
@needs_cxx
def test_bindings_syntax(tmp_path):
    from torch.utils.cpp_extension import include_paths

    cuda_inc = _cuda_include(NVCC)
    if cuda_inc is None:
        pytest.skip("CUDA headers (cuda_runtime_api.h) not found")
    # The CPU wheel ships c10/cuda headers but not the CMake-generated macros header; supply the generated content.
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    py_inc = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(py_inc, "Python.h")):
        pytest.skip(f"Python.h not found in {py_inc}")
    cmd = [CXX, CXX_STD, "-fsyntax-only", "-Wall", "-Wextra", "-DTORCH_EXTENSION_NAME=_C",
           "-DTORCH_API_INCLUDE_EXTENSION_H", f"-I{CSRC}"]
    for inc in [*include_paths(), str(tmp_path / "shim"), py_inc, cuda_inc]:
        cmd.append(f"-isystem{inc}")
    cmd.append(str(CSRC / "bindings.cpp"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "warning" not in proc.stderr, proc.stderr[-6000:]


# ------------------------------------------------------------------------------------- CPU layout emulation
@pytest.fixture(scope="module")
def host_test(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    exe = tmp_path_factory.mktemp("host") / "host_layout_test"
    proc = subprocess.run([CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                           str(CSRC / "test" / "host_layout_test.cpp")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.mark.parametrize("mode", ["attention", "qmm"])
def test_fragment_maps_emulated(host_test, mode):
    proc = subprocess.run([str(host_test), mode], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WRONG" not in proc.stdout and "OK" in proc.stdout, proc.stdout


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("B,side,r,C", [(1, 4, 2, 3), (2, 6, 2, 5), (1, 6, 3, 2), (2, 8, 2, 1)])
def test_pixel_shuffle_map_matches_reference(host_test, B, side, r, C, version):
    proc = subprocess.run([str(host_test), "shuffle", str(B), str(side), str(r), str(C), version],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = torch.tensor([int(v) for v in proc.stdout.split()], dtype=torch.int64)
    x = torch.arange(B * side * side * C, dtype=torch.float64).reshape(B, side * side, C)
    want = F_ref.pixel_shuffle(x, 1.0 / r, version).reshape(-1).to(torch.int64)
    assert got.shape == want.shape
    assert torch.equal(got, want), f"first mismatch at {int((got != want).nonzero()[0])}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
