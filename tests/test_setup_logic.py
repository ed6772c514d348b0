"""setup.py's build decision without a GPU: every branch of ``cuda_build_plan`` / ``cuda_arch_list`` /
``find_cuda_home`` with fake torch modules, fake CUDA toolkits (an nvcc binary, wrapper scripts, symlinks, a toolkit
without headers) and environments; that torch (not setup.py) picks the C++ standard; and a real ``pip wheel`` of the
project on this CPU-only torch that must not try to build the extension (and must say so once)."""
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


TOOLKIT = "<fake toolkit>"  # fake_torch's default CUDA_HOME: replaced by the fake toolkit's path (fixture `tk`)
_TK: dict = {}


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def tk(tmp_path_factory):
    """Fake toolkits: ``good`` (bin/nvcc + include/cuda_runtime.h), ``noinc`` (bin/nvcc only), a wrapper script
    around each (like /usr/local/bin/nvcc here: ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``), a wrapper around the
    wrapper, and a symlink to the good nvcc."""
    root = tmp_path_factory.mktemp("cuda")
    good, noinc = root / "cuda-13.0", root / "cuda-noinc"
    _write_exe(good / "bin" / "nvcc", "\x7fELF not really\n")
    (good / "include").mkdir()
    (good / "include" / "cuda_runtime.h").write_text("#pragma once\n")
    _write_exe(noinc / "bin" / "nvcc", "\x7fELF not really\n")
    _write_exe(root / "wrap" / "nvcc", f'#!/bin/sh\n# wrapper\nexec {good}/bin/nvcc "$@"\n')
    _write_exe(root / "wrap2" / "nvcc", f'#!/bin/sh\nexec "{root}/wrap/bin/nvcc" "$@"\n')
    _write_exe(root / "wrap" / "bin" / "nvcc", f"#!/bin/bash\nexec {good}/bin/nvcc \"$@\"\n")
    _write_exe(root / "wrapnoinc" / "nvcc", f'#!/bin/sh\nexec {noinc}/bin/nvcc "$@"\n')
    (root / "link").mkdir()
    (root / "link" / "nvcc").symlink_to(good / "bin" / "nvcc")
    (root / "empty").mkdir()
    _TK.update(root=root, good=str(good), noinc=str(noinc))
    return _TK


@pytest.fixture(autouse=True)
def _hermetic_toolkit(request, monkeypatch):
    """Decision tests see only the fake toolkits, never this machine's /usr/local/cuda, and no build-time switch
    from the environment (CI runs these tests with INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1 for the test-time meaning)."""
    for var in ("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "INTERNVL_KERNELS_NO_CUDA", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)
    if "S" in request.fixturenames:
        request.getfixturevalue("tk")
        monkeypatch.setattr(request.getfixturevalue("S"), "DEFAULT_CUDA_HOMES", ())


def fake_torch(cuda="13.0", cuda_home=TOOLKIT, caps=(), version="2.11.0+cu130"):
    caps = list(caps)
    if cuda_home == TOOLKIT:
        cuda_home = _TK["good"]
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


def test_cuda_home(S, tk):
    build, reason = S.cuda_build_plan({}, fake_torch(cuda_home=None), SOURCES)
    assert not build and "CUDA_HOME" in reason and "no CUDA toolkit found" in reason
    build, reason = S.cuda_build_plan({"CUDA_HOME": tk["good"]}, fake_torch(cuda_home=None), SOURCES)
    assert build and f"CUDA_HOME={tk['good']}" in reason


def test_torch_guess_without_nvcc_is_no_toolkit(S, tk):
    """torch's CUDA_HOME guess without bin/nvcc (a CUDA runtime image): the pure-Python install, not an error."""
    build, reason = S.cuda_build_plan({"PATH": str(tk["root"] / "empty")}, fake_torch(cuda_home=str(tk["root"])),
                                      SOURCES)
    assert not build and "no CUDA toolkit found" in reason


def test_nvcc_binary_on_path(S, tk):
    home, how = S.find_cuda_home({"PATH": f"{tk['root'] / 'empty'}:{tk['good']}/bin"})
    assert home == tk["good"] and "nvcc on PATH" in how


@pytest.mark.parametrize("folder", ["wrap", "wrap2", "link"])
def test_wrapper_or_symlink_nvcc_is_resolved(S, tk, folder):
    """torch would guess the wrapper's parent folder; setup.py follows the wrapper to the real toolkit."""
    wrapper = tk["root"] / folder / "nvcc"
    assert S.resolve_nvcc(str(wrapper)) == os.path.realpath(os.path.join(tk["good"], "bin", "nvcc"))
    home, how = S.find_cuda_home({"PATH": str(wrapper.parent)}, torch_cuda_home=str(tk["root"]))
    assert os.path.realpath(home) == os.path.realpath(tk["good"]), how
    assert str(wrapper) in how and "->" in how
    build, reason = S.cuda_build_plan({"PATH": str(wrapper.parent)}, fake_torch(cuda_home=str(tk["root"])), SOURCES)
    assert build and os.path.realpath(tk["good"]) in reason


def test_unreadable_or_opaque_wrapper_stays_itself(S, tk, tmp_path):
    opaque = _write_exe(tmp_path / "nvcc", '#!/bin/sh\nexec "$CUDA_ROOT/bin/nvcc" "$@"\n')
    assert S.resolve_nvcc(str(opaque)) == str(opaque)
    assert S.resolve_nvcc(str(tmp_path / "missing")) == str(tmp_path / "missing")


def test_wrapper_without_headers_stops(S, tk):
    """nvcc is there but no include/cuda_runtime.h anywhere it leads: stop, naming what was looked for + CUDA_HOME."""
    path = str(tk["root"] / "wrapnoinc")
    with pytest.raises(S.CudaToolkitError) as ei:
        S.cuda_build_plan({"PATH": path}, fake_torch(cuda_home=None), SOURCES)
    msg = str(ei.value)
    assert os.path.join(tk["noinc"], "include", "cuda_runtime.h") in msg  # where the wrapper leads
    assert os.path.join(str(tk["root"]), "include", "cuda_runtime.h") in msg  # torch's guess (the wrapper's parent)
    assert f"{path}/nvcc" in msg and "CUDA_HOME is unset" in msg and "INTERNVL_KERNELS_NO_CUDA" in msg


def test_cuda_home_without_headers_stops(S, tk):
    with pytest.raises(S.CudaToolkitError) as ei:
        S.find_cuda_home({"CUDA_HOME": tk["noinc"], "PATH": f"{tk['good']}/bin"})
    msg = str(ei.value)
    assert f"CUDA_HOME={tk['noinc']}" in msg and os.path.join(tk["noinc"], "include", "cuda_runtime.h") in msg
    with pytest.raises(S.CudaToolkitError, match="CUDA_PATH="):
        S.find_cuda_home({"CUDA_PATH": tk["noinc"]})


def test_cuda_home_wins_over_path(S, tk):
    home, how = S.find_cuda_home({"CUDA_HOME": tk["good"], "PATH": str(tk["root"] / "wrapnoinc")})
    assert home == tk["good"] and how == f"CUDA_HOME={tk['good']}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on PATH on this machine")
def test_this_machines_nvcc():
    """The nvcc on this machine's PATH (a wrapper script here) leads to a toolkit with include/cuda_runtime.h."""
    spec = importlib.util.spec_from_file_location("internvl_kernels_setup_real", ROOT / "setup.py")
    real = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    home, how = real.find_cuda_home(env)
    assert home and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")), how
    nvcc = shutil.which("nvcc")
    if Path(nvcc).read_bytes()[:2] == b"#!":
        assert "->" in how  # followed the wrapper instead of taking its parent folder


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
    env = {k: v for k, v in os.environ.items()
           if k not in ("INTERNVL_KERNELS_NO_CUDA", "INTERNVL_KERNELS_REQUIRE_CUDA_EXT")}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out),
         str(src)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    wheels = list(out.glob("internvl_kernels-*.whl"))
    assert len(wheels) == 1, log[-3000:]
    # what pip shows even without -v: a pure-Python wheel name (a CUDA build is tagged cp3xx-cp3xx-linux_x86_64)
    assert wheels[0].name.endswith("-py3-none-any.whl"), wheels[0].name
    assert f"filename={wheels[0].name}" in log
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert not [n for n in names if n.endswith((".so", ".pyd")) or "/_C" in n], names
    assert "internvl_kernels/ops/_cuda.py" in names
    assert "installing without the CUDA extension" in log
    assert "has no CUDA" in log
    assert "building the CUDA extension" not in log
    assert "nvcc" not in log.lower().replace("no nvcc", "")


def test_extension_object_in_the_build_branch(S, tk, monkeypatch):
    """The CUDA branch up to (not including) compilation: sources, flags, and the env it hands to torch's build."""
    import torch.utils.cpp_extension as ce

    monkeypatch.setattr(S, "cuda_build_config",
                        lambda *a, **k: {"build": True, "reason": "test", "cuda_home": tk["good"], "archs": "9.0"})
    monkeypatch.setattr(ce, "CUDA_HOME", str(tk["root"]))  # torch's own (wrong) guess
    saved = dict(os.environ)
    try:
        for key in ("TORCH_CUDA_ARCH_LIST", "MAX_JOBS", "NVCC_THREADS", "CUDA_HOME"):
            os.environ.pop(key, None)
        os.environ["TORCH_CUDA_ARCH_LIST"] = "7.5;9.0"
        exts, cmdclass = S.extensions()
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"  # sm_75 dropped before torch reads it
        assert os.environ["MAX_JOBS"] and os.environ["NVCC_THREADS"] == "2"
        assert os.environ["CUDA_HOME"] == tk["good"] and ce.CUDA_HOME == tk["good"]  # the resolved toolkit
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (ext,) = exts
    assert ext.name == "internvl_kernels._C"
    srcs = sorted(os.path.basename(s) for s in ext.sources)
    assert "bindings.cpp" in srcs and {p.name for p in (ROOT / "csrc").glob("*.cu")} <= set(srcs)
    assert not [s for s in ext.sources if "/test/" in s.replace(os.sep, "/")]  # the host emulation stays out
    assert "--threads" in ext.extra_compile_args["nvcc"]
    # torch picks the C++ standard (C++20 for torch >= 2.14 headers): no -std flag for host or nvcc files
    assert not [f for f in ext.extra_compile_args["cxx"] + ext.extra_compile_args["nvcc"] if "-std" in f], \
        ext.extra_compile_args
    assert "build_ext" in cmdclass


def test_toolkit_error_stops_the_build(S, monkeypatch):
    def boom(*a, **k):
        raise S.CudaToolkitError("found a CUDA compiler but no include/cuda_runtime.h in /x; CUDA_HOME is unset")

    monkeypatch.setattr(S, "cuda_build_config", boom)
    with pytest.raises(SystemExit, match="internvl-kernels setup: error: found a CUDA compiler.*CUDA_HOME is unset"):
        S.extensions()


def test_require_cuda_ext_turns_a_skip_into_an_error(S, monkeypatch):
    monkeypatch.setattr(S, "cuda_build_config", lambda *a, **k: {"build": False, "reason": "torch 2.13.0+cpu has no "
                                                                 "CUDA", "cuda_home": None, "archs": None})
    monkeypatch.setenv("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "1")
    with pytest.raises(SystemExit, match="INTERNVL_KERNELS_REQUIRE_CUDA_EXT is set but installing without the CUDA "
                                         "extension: torch 2.13.0\\+cpu has no CUDA"):
        S.extensions()
    monkeypatch.setenv("INTERNVL_KERNELS_REQUIRE_CUDA_EXT", "0")
    assert S.extensions() == ([], {})


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_torch_chooses_cxx20_when_no_std_is_given(tmp_path):
    """The premise of passing no -std flag: torch's BuildExtension then adds the standard its headers need (>= C++20
    with this torch). A real build of a one-file extension whose source only compiles as C++20."""
    (tmp_path / "probe.cpp").write_text(
        "#if __cplusplus < 202002L\n#error torch did not add -std=c++20\n#endif\n"
        "#include <concepts>\ntemplate <std::integral T> T twice(T v) { return 2 * v; }\n"
        "int probe() { return twice(21); }\n")
    (tmp_path / "setup_probe.py").write_text(
        "from setuptools import setup\n"
        "from torch.utils.cpp_extension import BuildExtension, CppExtension\n"
        "setup(name='probe', ext_modules=[CppExtension('probe', ['probe.cpp'], extra_compile_args={'cxx': ['-O0']})],"
        " cmdclass={'build_ext': BuildExtension.with_options(use_ninja=False)})\n")
    proc = subprocess.run([sys.executable, "setup_probe.py", "build_ext", "--inplace"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "-std=c++20" in log, log[-4000:]
    assert list(tmp_path.glob("probe*.so")), log[-2000:]
