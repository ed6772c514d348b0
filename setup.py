"""Build script: pure Python + Triton everywhere; the CUDA extension in csrc/ only where torch has CUDA.

Decision logic lives in :func:`cuda_build_plan` / :func:`cuda_arch_list` so tests can exercise every branch without
a GPU (tests/test_setup_logic.py). Environment:
  INTERNVL_KERNELS_NO_CUDA=1   never build the extension
  TORCH_CUDA_ARCH_LIST         e.g. "8.0;9.0" -- archs below 8.0 are dropped (the kernels use sm_80 instructions:
                               cp.async, bf16 mma.sync). Unset: the visible GPUs' archs, else "8.0;8.6;8.9;9.0+PTX".
  MAX_JOBS                     parallel compile jobs (ninja); default min(cpu count, 8)
  NVCC_THREADS                 nvcc --threads (parallel arch targets inside one job); default 2
  CUDA_HOME                    the CUDA toolkit (else torch's detection: CUDA_PATH, `which nvcc`, /usr/local/cuda)
The CUDA build needs the torch that will run it at build time, i.e. `pip install --no-build-isolation .`: an
isolated build environment has no torch (it is deliberately not in [build-system].requires), so plain
`pip install .` installs the pure-Python package and says so once.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_ARCH = 80  # sm_80: cp.async, ldmatrix, bf16 mma.sync
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"

_said: set = set()


def _log(msg: str) -> None:
    """Print each message once per process."""
    if msg in _said:
        return
    _said.add(msg)
    print(f"internvl-kernels setup: {msg}", file=sys.stderr)


def _import_torch():
    try:
        import torch  # noqa: F401  (only present with --no-build-isolation)
    except ImportError:
        return None
    import torch

    return torch


def _torch_cuda_home(torch_mod):
    try:
        return torch_mod.utils.cpp_extension.CUDA_HOME
    except AttributeError:
        try:
            from torch.utils.cpp_extension import CUDA_HOME
        except Exception:  # pragma: no cover - exotic torch
            return None
        return CUDA_HOME


def cuda_build_plan(env=None, torch_mod=None, sources=None):
    """Return ``(build: bool, reason: str)``. Never imports a torch that is not already installed.

    ``torch_mod`` / ``sources`` are for tests (a fake torch, a fake source list); by default the installed torch
    and the files in csrc/.
    """
    env = os.environ if env is None else env
    if env.get("INTERNVL_KERNELS_NO_CUDA", "0").strip() not in ("", "0"):
        return False, "INTERNVL_KERNELS_NO_CUDA is set"
    if sources is None:
        sources = glob.glob(os.path.join(HERE, "csrc", "*.cu"))
    if not sources:
        return False, "no CUDA sources in csrc/"
    torch_mod = _import_torch() if torch_mod is None else torch_mod
    if torch_mod is None:
        return False, ("torch is not importable in the build environment (use `pip install --no-build-isolation .` "
                       "for the CUDA build)")
    if getattr(torch_mod.version, "cuda", None) is None:
        return False, f"torch {torch_mod.__version__} has no CUDA"
    cuda_home = env.get("CUDA_HOME") or _torch_cuda_home(torch_mod)
    if not cuda_home:
        return False, "CUDA_HOME not found (no nvcc on PATH); set CUDA_HOME to the CUDA toolkit"
    archs, dropped = cuda_arch_list(env, _visible_capabilities(torch_mod))
    if not archs:
        return False, (f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')!r} has no architecture >= 8.0 "
                       "(the kernels need sm_80+)")
    return True, (f"building the CUDA extension against torch {torch_mod.__version__} (CUDA {torch_mod.version.cuda}) "
                  f"for {archs}" + (f" (dropped {dropped}: the kernels need sm_80+)" if dropped else ""))


def _arch_value(entry: str):
    """'8.6+PTX' -> 86, '9.0a' -> 90; None when unparsable."""
    core = entry.split("+")[0].strip().rstrip("af")
    try:
        major, minor = core.split(".")
        return int(major) * 10 + int(minor)
    except ValueError:
        return None


def cuda_arch_list(env=None, visible=()):
    """``(TORCH_CUDA_ARCH_LIST to build with, dropped entries)``.

    From ``env['TORCH_CUDA_ARCH_LIST']`` minus the archs below 8.0; when unset, the visible GPUs' capabilities
    ``visible`` (``[(major, minor), ...]``) that are >= 8.0, else :data:`DEFAULT_ARCHS`.
    """
    env = os.environ if env is None else env
    raw = env.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if raw:
        entries = [e for e in raw.replace(",", ";").replace(" ", ";").split(";") if e.strip()]
        keep = [e for e in entries if (_arch_value(e) or 0) >= MIN_ARCH]
        dropped = [e for e in entries if e not in keep]
        return ";".join(keep), dropped
    caps = sorted({f"{ma}.{mi}" for ma, mi in visible if ma * 10 + mi >= MIN_ARCH})
    if caps:
        return ";".join(caps), []
    return DEFAULT_ARCHS, []


def _visible_capabilities(torch_mod):
    try:
        if torch_mod.cuda.is_available():
            return [tuple(torch_mod.cuda.get_device_capability(i)) for i in range(torch_mod.cuda.device_count())]
    except Exception:  # no driver / fake torch in tests
        pass
    return []


def build_env_defaults(env=None, cpu_count=None) -> dict:
    """Environment values the build sets when the user did not: MAX_JOBS and NVCC_THREADS."""
    env = os.environ if env is None else env
    cpu_count = cpu_count or os.cpu_count() or 1
    out = {}
    if not env.get("MAX_JOBS"):
        out["MAX_JOBS"] = str(max(1, min(cpu_count, 8)))
    if not env.get("NVCC_THREADS"):
        out["NVCC_THREADS"] = "2"
    return out


def extensions():
    build, reason = cuda_build_plan()
    if not build:
        _log(f"installing without the CUDA extension: {reason}. The Triton and eager backends are available.")
        return [], {}
    _log(reason)
    import torch
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs, _ = cuda_arch_list(os.environ, _visible_capabilities(torch))
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch when it builds the nvcc -gencode flags
    for key, value in build_env_defaults().items():
        os.environ[key] = value
    _log(f"TORCH_CUDA_ARCH_LIST={archs} MAX_JOBS={os.environ['MAX_JOBS']} NVCC_THREADS={os.environ['NVCC_THREADS']}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="internvl_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--threads", os.environ["NVCC_THREADS"]],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
