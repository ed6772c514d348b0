"""Build script: pure Python + Triton everywhere; the CUDA extension in csrc/ only where torch has CUDA.

Decision logic lives in :func:`cuda_build_plan` so tests can exercise both branches without a GPU.
Environment:
  INTERNVL_KERNELS_NO_CUDA=1   never build the extension
  TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME   honoured as torch.utils.cpp_extension does
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"internvl-kernels setup: {msg}", file=sys.stderr)


def cuda_build_plan(env=None):
    """Return (build: bool, reason: str). Never imports a torch that is not already installed."""
    env = os.environ if env is None else env
    if env.get("INTERNVL_KERNELS_NO_CUDA", "0") not in ("", "0"):
        return False, "INTERNVL_KERNELS_NO_CUDA is set"
    sources = glob.glob(os.path.join(HERE, "csrc", "*.cu"))
    if not sources:
        return False, "no CUDA sources in csrc/"
    try:
        import torch  # noqa: F401  (only present with --no-build-isolation)
    except ImportError:
        return False, "torch is not importable in the build environment (use --no-build-isolation for the CUDA build)"
    import torch
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if env.get("CUDA_HOME") is None and CUDA_HOME is None:
        return False, "CUDA_HOME not found"
    return True, f"building the CUDA extension against torch {torch.__version__} (CUDA {torch.version.cuda})"


def extensions():
    build, reason = cuda_build_plan()
    if not build:
        _log(f"installing without the CUDA extension: {reason}. The Triton and eager backends are available.")
        return [], {}
    _log(reason)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CUDAExtension(
        name="internvl_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
