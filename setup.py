"""Build script: pure Python + Triton everywhere; the CUDA extension in csrc/ only where torch has CUDA.

Decision logic lives in :func:`cuda_build_config` / :func:`find_cuda_home` / :func:`cuda_arch_list` so tests can
exercise every branch without a GPU (tests/test_setup_logic.py). Environment:
  INTERNVL_KERNELS_NO_CUDA=1   never build the extension
  TORCH_CUDA_ARCH_LIST         e.g. "8.0;9.0" -- archs below 8.0 are dropped (the kernels use sm_80 instructions:
                               cp.async, bf16 mma.sync). Unset: the visible GPUs' archs, else "8.0;8.6;8.9;9.0+PTX".
  MAX_JOBS                     parallel compile jobs (ninja); default min(cpu count, 8)
  NVCC_THREADS                 nvcc --threads (parallel arch targets inside one job); default 2
  CUDA_HOME / CUDA_PATH        the CUDA toolkit; must contain include/cuda_runtime.h. Unset: the toolkit of the `nvcc`
                               on PATH -- symlinks and wrapper scripts (`exec /usr/local/cuda-X/bin/nvcc "$@"`) are
                               followed to the real nvcc -- else /usr/local/cuda. No nvcc anywhere: no extension.
                               nvcc found but no include/cuda_runtime.h: the build stops and names what it looked for.
  INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1   a build that would skip the extension fails instead (pip shows the reason)
The C++ standard is torch's choice (torch >= 2.14 headers need C++20; torch adds its -std flag only when the extension
passes none), so no -std flag is given for host or nvcc files.
The CUDA build needs the torch that will run it at build time, i.e. `pip install --no-build-isolation .`: an
isolated build environment has no torch (it is deliberately not in [build-system].requires), so plain
`pip install .` installs the pure-Python package and says so in one line -- which pip shows only with -v; without
-v the sign is the wheel pip names, internvl_kernels-*-py3-none-any.whl instead of a cp3xx-...-linux_x86_64 one.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_ARCH = 80  # sm_80: cp.async, ldmatrix, bf16 mma.sync
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)  # searched (for bin/nvcc) when neither CUDA_HOME nor nvcc on PATH is found
CUDA_RUNTIME_H = os.path.join("include", "cuda_runtime.h")

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


class CudaToolkitError(RuntimeError):
    """A CUDA toolkit is there (nvcc or CUDA_HOME) but unusable: the build stops rather than guess."""


def _env_flag(env, name) -> bool:
    return env.get(name, "0").strip().lower() not in ("", "0", "false", "no")


def resolve_nvcc(path: str, _depth: int = 0) -> str:
    """The real nvcc behind ``path``: symlinks resolved, and wrapper scripts (a small text file starting with ``#!``
    that runs another ``.../bin/nvcc``, e.g. ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) followed, up to 8 levels.
    Returns the last file reached (``path`` itself when it is the binary or an unreadable script)."""
    real = os.path.realpath(path)
    if _depth >= 8:
        return real
    try:
        with open(real, "rb") as f:
            head = f.read(8192)
    except OSError:
        return real
    if not head.startswith(b"#!"):
        return real  # an ELF binary (or anything that is not a script)
    text = head.decode("utf-8", "replace")
    for line in text.splitlines()[1:]:
        line = line.split("#", 1)[0]
        for target in re.findall(r"""(/[^\s"'`;|&]*/bin/nvcc)(?![\w.-])""", line):
            if os.path.isfile(target) and os.path.realpath(target) != real:
                return resolve_nvcc(target, _depth + 1)
    return real


def _which(cmd: str, env) -> str | None:
    path = env.get("PATH")
    return shutil.which(cmd, path=path) if path else None


def find_cuda_home(env=None, torch_cuda_home=None):
    """``(cuda_home, how)`` of the CUDA toolkit to build with, or ``(None, why)`` when there is no toolkit at all.

    Order: ``CUDA_HOME`` / ``CUDA_PATH`` (taken as given); the toolkit of the ``nvcc`` on ``PATH`` after
    :func:`resolve_nvcc` (torch's own guess, the folder above the wrapper, is tried after it); torch's ``CUDA_HOME``
    and :data:`DEFAULT_CUDA_HOMES` when they hold ``bin/nvcc``. A toolkit must contain ``include/cuda_runtime.h``;
    raises :class:`CudaToolkitError` naming every folder it looked in when nvcc / CUDA_HOME exist but none has it.
    """
    env = os.environ if env is None else env
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = env.get(var, "").strip()
        if home:
            if os.path.isfile(os.path.join(home, CUDA_RUNTIME_H)):
                return home, f"{var}={home}"
            raise CudaToolkitError(
                f"{var}={home} does not contain {CUDA_RUNTIME_H} (looked for {os.path.join(home, CUDA_RUNTIME_H)}); "
                "set CUDA_HOME to the CUDA toolkit's root folder (the one with bin/nvcc and include/), or "
                "INTERNVL_KERNELS_NO_CUDA=1 to install without the CUDA extension")
    looked: list[str] = []
    nvcc = _which("nvcc", env)
    if nvcc:
        real = resolve_nvcc(nvcc)
        for cand in (os.path.dirname(os.path.dirname(real)), os.path.dirname(os.path.dirname(nvcc))):
            if cand in looked:
                continue
            looked.append(cand)
            if os.path.isfile(os.path.join(cand, CUDA_RUNTIME_H)):
                how = f"nvcc on PATH: {nvcc}" + (f" -> {real}" if real != nvcc else "")
                return cand, how
    for cand in (torch_cuda_home, *DEFAULT_CUDA_HOMES):
        if not cand or cand in looked or not os.path.exists(os.path.join(cand, "bin", "nvcc")):
            continue
        looked.append(cand)
        if os.path.isfile(os.path.join(cand, CUDA_RUNTIME_H)):
            return cand, f"{cand}/bin/nvcc"
    if not looked:
        return None, ("no CUDA toolkit found (no nvcc on PATH, CUDA_HOME unset, no "
                      f"{' or '.join(os.path.join(h, 'bin', 'nvcc') for h in DEFAULT_CUDA_HOMES)}); "
                      "set CUDA_HOME to the CUDA toolkit")
    if nvcc:
        where = f"nvcc on PATH is {nvcc}, resolved to {resolve_nvcc(nvcc)}"
    else:
        where = "nvcc in " + ", ".join(os.path.join(c, "bin") for c in looked)
    raise CudaToolkitError(
        f"found a CUDA compiler ({where}) but no {CUDA_RUNTIME_H} in "
        + ", ".join(os.path.join(c, CUDA_RUNTIME_H) for c in looked)
        + "; CUDA_HOME is unset -- set CUDA_HOME to the CUDA toolkit's root folder (the one with include/"
        "cuda_runtime.h), or INTERNVL_KERNELS_NO_CUDA=1 to install without the CUDA extension")


def cuda_build_config(env=None, torch_mod=None, sources=None) -> dict:
    """``{"build": bool, "reason": str, "cuda_home": str|None, "archs": str|None}``. Never imports a torch that is
    not already installed; raises :class:`CudaToolkitError` for a toolkit that is there but unusable.

    ``torch_mod`` / ``sources`` are for tests (a fake torch, a fake source list); by default the installed torch
    and the files in csrc/.
    """
    env = os.environ if env is None else env

    def skip(reason):
        return {"build": False, "reason": reason, "cuda_home": None, "archs": None}

    if _env_flag(env, "INTERNVL_KERNELS_NO_CUDA"):
        return skip("INTERNVL_KERNELS_NO_CUDA is set")
    if sources is None:
        sources = glob.glob(os.path.join(HERE, "csrc", "*.cu"))
    if not sources:
        return skip("no CUDA sources in csrc/")
    torch_mod = _import_torch() if torch_mod is None else torch_mod
    if torch_mod is None:
        return skip("torch is not importable in the build environment (use `pip install --no-build-isolation .` "
                    "for the CUDA build)")
    if getattr(torch_mod.version, "cuda", None) is None:
        return skip(f"torch {torch_mod.__version__} has no CUDA")
    cuda_home, how = find_cuda_home(env, _torch_cuda_home(torch_mod))
    if cuda_home is None:
        return skip(how)
    archs, dropped = cuda_arch_list(env, _visible_capabilities(torch_mod))
    if not archs:
        return skip(f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST')!r} has no architecture >= 8.0 "
                    "(the kernels need sm_80+)")
    reason = (f"building the CUDA extension against torch {torch_mod.__version__} (CUDA {torch_mod.version.cuda}) "
              f"for {archs}" + (f" (dropped {dropped}: the kernels need sm_80+)" if dropped else "")
              + f" with CUDA_HOME={cuda_home} ({how})")
    return {"build": True, "reason": reason, "cuda_home": cuda_home, "archs": archs}


def cuda_build_plan(env=None, torch_mod=None, sources=None):
    """Return ``(build: bool, reason: str)`` (see :func:`cuda_build_config`)."""
    cfg = cuda_build_config(env, torch_mod, sources)
    return cfg["build"], cfg["reason"]


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
    try:
        cfg = cuda_build_config()
    except CudaToolkitError as e:
        raise SystemExit(f"internvl-kernels setup: error: {e}") from None
    if not cfg["build"]:
        msg = f"installing without the CUDA extension: {cfg['reason']}. The Triton and eager backends are available."
        if _env_flag(os.environ, "INTERNVL_KERNELS_REQUIRE_CUDA_EXT"):
            raise SystemExit(f"internvl-kernels setup: error: INTERNVL_KERNELS_REQUIRE_CUDA_EXT is set but {msg}")
        _log(msg)
        return [], {}
    _log(cfg["reason"])
    import torch.utils.cpp_extension as cpp_ext

    # torch computed its CUDA_HOME at import (for a wrapper nvcc: the wrapper's parent folder); use the real toolkit
    os.environ["CUDA_HOME"] = cfg["cuda_home"]
    cpp_ext.CUDA_HOME = cfg["cuda_home"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = cfg["archs"]  # read by torch when it builds the nvcc -gencode flags
    for key, value in build_env_defaults().items():
        os.environ[key] = value
    _log(f"TORCH_CUDA_ARCH_LIST={cfg['archs']} MAX_JOBS={os.environ['MAX_JOBS']} "
         f"NVCC_THREADS={os.environ['NVCC_THREADS']} CUDA_HOME={cfg['cuda_home']}")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    ext = cpp_ext.CUDAExtension(
        name="internvl_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # no -std flag: torch adds the standard its headers need (C++20 for torch >= 2.14) when none is given
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", "--threads", os.environ["NVCC_THREADS"]],
        },
    )
    return [ext], {"build_ext": cpp_ext.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
