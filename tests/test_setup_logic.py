"""setup.py's build decision without a GPU: every branch of ``cuda_build_plan`` / ``cuda_arch_list`` with fake torch
modules and environments, and a real ``pip wheel`` of the project on this CPU-only torch that must not try to build
the extension (and must say so once)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def S():
    spec = importlib.util.spec_from_file_location("internvl_kernels_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() only runs under __main__
    return mod


def fake_torch(cuda="13.0", cuda_home="/usr/local/cuda", caps=(), version="2.11.0+cu130"):
    caps = list(caps)
    return types.SimpleNamespace(
        __version__=version,
        version=types.SimpleNamespace(cuda=cuda),
        utils=types.SimpleNamespace(cpp_extension=types.SimpleNamespace(CUDA_HOME=cuda_home)),
        cuda=types.SimpleNamespace(
            is_available=lambda: bool(caps), device_count=lambda: len(caps), get_device_capability=lambda i: caps[i]
        ),
    )


SOURCES = ["csrc/attention.cu"]


def test_opt_out(S):
    for value in ("1", "yes", "true"):
        build, reason = S.cuda_build_plan({"INTERNVL_KERNELS_NO_CUDA": value}, fake_torch(), SOURCES)
        assert not build and "INTERNVL_KERNELS_NO_CUDA" in reason
    for value in ("0", ""):
        build, _ = S.cuda_build_plan({"INTERNVL_KERNELS_NO_CUDA": value}, fake_torch(), SOURCES)
        assert build


def test_cuda_torch_builds(S):
    build, reason = S.cuda_build_plan({}, fake_torch(caps=[(9, 0)]), SOURCES)
    assert build
    assert "2.11.0+cu130" in reason and "CUDA 13.0" in reason and "9.0" in reason


def test_no_sources(S):
    build, reason = S.cuda_build_plan({}, fake_torch(), [])
    assert not build and "no CUDA sources" in reason


def test_real_sources_are_found(S):
    build, _ = S.cuda_build_plan({}, fake_torch())
    assert build, "setup.py did not find csrc/*.cu"


def test_cpu_torch(S):
    build, reason = S.cuda_build_plan({}, fake_torch(cuda=None, version="2.13.0+cpu"), SOURCES)
    assert not build and "has no CUDA" in reason and "2.13.0+cpu" in reason


@pytest.mark.skipif(torch.version.cuda is not None, reason="this branch needs the CPU-only torch of the CI machine")
def test_installed_cpu_torch(S):
    build, reason = S.cuda_build_plan({}, None, SOURCES)
    assert not build and "has no CUDA" in reason


def test_torch_not_importable(S, monkeypatch):
    monkeypatch.setattr(S, "_import_torch", lambda: None)
    build, reason = S.cuda_build_plan({}, None, SOURCES)
    assert not build and "--no-build-isolation" in reason


def test_cuda_home(S):
    build, reason = S.cuda_build_plan({}, fake_torch(cuda_home=None), SOURCES)
    assert not build and "CUDA_HOME" in reason
    build, _ = S.cuda_build_plan({"CUDA_HOME": "/opt/cuda"}, fake_torch(cuda_home=None), SOURCES)
    assert build


def test_arch_list(S):
    archs, dropped = S.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "7.5;8.0;8.6+PTX;9.0a"})
    assert archs == "8.0;8.6+PTX;9.0a" and dropped == ["7.5"]
    archs, dropped = S.cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0 9.0"})
    assert archs == "8.0;9.0" and dropped == []
    assert S.cuda_arch_list({}, [(9, 0)]) == ("9.0", [])
    assert S.cuda_arch_list({}, [(8, 0), (9, 0), (8, 0)]) == ("8.0;9.0", [])
    assert S.cuda_arch_list({}, []) == (S.DEFAULT_ARCHS, [])
    assert S.cuda_arch_list({}, [(7, 5)]) == (S.DEFAULT_ARCHS, [])  # a pre-Ampere GPU alone: build the defaults


def test_arch_list_without_supported_arch(S):
    build, reason = S.cuda_build_plan({"TORCH_CUDA_ARCH_LIST": "7.0;7.5"}, fake_torch(), SOURCES)
    assert not build and "8.0" in reason
    build, reason = S.cuda_build_plan({"TORCH_CUDA_ARCH_LIST": "7.5;9.0"}, fake_torch(), SOURCES)
    assert build and "dropped ['7.5']" in reason


def test_build_env_defaults(S):
    assert S.build_env_defaults({}, cpu_count=16) == {"MAX_JOBS": "8", "NVCC_THREADS": "2"}
    assert S.build_env_defaults({}, cpu_count=2) == {"MAX_JOBS": "2", "NVCC_THREADS": "2"}
    assert S.build_env_defaults({"MAX_JOBS": "3", "NVCC_THREADS": "1"}, cpu_count=16) == {}


def test_extensions_without_cuda_says_so_once(S, monkeypatch, capsys):
    monkeypatch.setenv("INTERNVL_KERNELS_NO_CUDA", "1")
    S._said.clear()
    assert S.extensions() == ([], {})
    assert S.extensions() == ([], {})
    err = capsys.readouterr().err
    assert err.count("installing without the CUDA extension") == 1, err


def _copy_project(dst: Path) -> Path:
    src = dst / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")
    for name in ("internvl_kernels", "quantize", "csrc"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the no-CUDA install path on a CPU-only torch")
def test_pip_wheel_without_cuda_does_not_build(tmp_path):
    """`pip install .` on a machine without CUDA: a pure-Python wheel, one line saying why, no compiler run."""
    src = _copy_project(tmp_path)
    out = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "INTERNVL_KERNELS_NO_CUDA"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(src)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    wheels = list(out.glob("internvl_kernels-*.whl"))
    assert len(wheels) == 1, log[-3000:]
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd")) or "/_C" in n], names
    assert "internvl_kernels/ops/_cuda.py" in names
    assert "installing without the CUDA extension" in log
    assert "has no CUDA" in log
    assert "building the CUDA extension" not in log
    assert "nvcc" not in log.lower().replace("no nvcc", "")


def test_extension_object_in_the_build_branch(S, monkeypatch):
    """The CUDA branch up to (not including) compilation: sources, flags, and the env it hands to torch's build."""
    import torch.utils.cpp_extension as ce

    monkeypatch.setattr(S, "cuda_build_plan", lambda *a, **k: (True, "test"))
    monkeypatch.setattr(ce, "CUDA_HOME", ce.CUDA_HOME or "/usr/local/cuda")
    saved = dict(os.environ)
    try:
        for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "NVCC_THREADS"):
            os.environ.pop(key, None)
        os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;9.0"
        exts, cmdclass = S.extensions()
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # sm_75 dropped before torch reads it
        assert os.environ["MAX_JOBS"] and os.environ["NVCC_THREADS"] == "2"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (ext,) = exts
    assert ext.name == "internvl_kernels._C"
    srcs = sorted(os.path.basename(s) for s in ext.sources)
    assert "bindings.cpp" in srcs and {p.name for p in (ROOT / "csrc").glob("*.cu")} <= set(srcs)
    assert not [s for s in ext.sources if "/test/" in s.replace(os.sep, "/")]  # the host emulation stays out
    assert "--threads" in ext.extra_compile_args["nvcc"]
    assert "build_ext" in cmdclass
