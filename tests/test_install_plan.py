"""scripts/install.sh's torch / triton decisions (scripts/install_plan.py): a torch in the environment is kept, the
CPU pin applies only when there is none, and the constraints handed to pip never contradict the installed torch."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# torch 2.14.1's (CUDA 13.0 wheel) own requirement list, as its METADATA declares it
TORCH_2_14_1_REQUIRES = [
    "filelock", "typing-extensions>=4.10.0", "setuptools>=77.0.3", "sympy>=1.13.3",
    'cuda-toolkit[cublas,cudart,cufft,cufile,cupti,curand,cusolver,cusparse,nvjitlink,nvrtc,nvtx]==13.0.3; '
    'platform_system == "Linux"',
    'nvidia-cudnn-cu13==9.24.0.43; platform_system == "Linux"',
    'triton~=3.8.0; platform_system == "Linux" and python_version < "3.15"',
    'optree>=0.13.0; extra == "optree"',
]
CPU_REQUIRES = ["filelock", "typing-extensions>=4.10.0", "sympy>=1.13.3", 'pyyaml; extra == "pyyaml"']
BASE = "# comment\nnumpy<2.4\ntriton==3.6.0\ntorch==2.13.0\ntransformers>=5.17,<6\n"


@pytest.fixture(scope="module")
def P():
    spec = importlib.util.spec_from_file_location("install_plan", ROOT / "scripts" / "install_plan.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_installed_torch_is_kept(P):
    assert P.torch_spec(("2.14.1", TORCH_2_14_1_REQUIRES), {}) == ""
    assert P.torch_spec(("2.13.0+cpu", CPU_REQUIRES), {"TORCH_SPEC": " "}) == ""


def test_cpu_pin_only_without_torch(P):
    assert P.torch_spec(None, {}) == P.DEFAULT_TORCH == "torch==2.13.0"


def test_torch_spec_overrides(P):
    assert P.torch_spec(("2.13.0+cpu", CPU_REQUIRES), {"TORCH_SPEC": "torch==2.11.0"}) == "torch==2.11.0"
    assert P.torch_spec(None, {"TORCH_SPEC": "torch==2.14.1"}) == "torch==2.14.1"


@pytest.mark.skipif(not sys.platform.startswith("linux") or sys.version_info >= (3, 15),
                    reason="torch 2.14.1 requires triton only on Linux, Python < 3.15")
def test_triton_follows_the_cuda_torch(P):
    assert P.triton_constraint(TORCH_2_14_1_REQUIRES) == "triton~=3.8.0"
    text = P.constraints(("2.14.1", TORCH_2_14_1_REQUIRES), BASE)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == ["numpy<2.4", "transformers>=5.17,<6", "torch==2.14.1", "triton~=3.8.0"], text
    assert "3.6.0" not in text  # the CPU pin would make pip swap torch 2.14.1 for the CPU wheel


def test_cpu_torch_gets_the_tested_triton(P):
    assert P.triton_constraint(CPU_REQUIRES) == P.CPU_TRITON == "triton==3.6.0"
    text = P.constraints(("2.13.0+cpu", CPU_REQUIRES), BASE)
    assert "torch==2.13.0+cpu" in text.splitlines() and "triton==3.6.0" in text.splitlines()
    assert "torch==2.13.0\n" not in text  # the base file's own torch line is dropped


def test_triton_marker_not_matching_this_platform(P):
    reqs = ['triton==9.9.9; platform_system == "NoSuchOS"']
    assert P.triton_constraint(reqs) == P.CPU_TRITON


def test_constraints_need_a_torch(P):
    with pytest.raises(SystemExit, match="no torch is installed"):
        P.constraints(None, BASE)


def test_repo_constraints_do_not_pin_torch_or_triton():
    lines = [ln.strip() for ln in (ROOT / "constraints.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    assert lines, "constraints.txt is empty"
    assert not [ln for ln in lines if ln.lower().startswith(("torch", "triton"))], lines


def test_constraints_match_this_environment(P):
    """The generated constraints for the torch installed here are satisfied by this environment's torch and triton."""
    from pip._vendor.packaging.requirements import Requirement

    inst = P.installed_torch()
    assert inst is not None and inst[0] == md.version("torch")
    assert torch.__version__.startswith(inst[0].split("+")[0])  # torch.__version__ may add a local tag (+cu130)
    text = P.constraints(inst, (ROOT / "constraints.txt").read_text())
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        req = Requirement(ln)
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            continue
        assert req.specifier.contains(have, prereleases=True), f"{ln} contradicts the installed {req.name} {have}"


def _install_sh(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    env.pop("TORCH_SPEC", None)
    env.update(env_extra or {})
    return subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def test_install_sh_dry_run_keeps_the_installed_torch():
    proc = _install_sh("test", env_extra={"INSTALL_DRY_RUN": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"torch {md.version('torch')} is installed; keeping it" in out
    cmds = [ln for ln in out.splitlines() if ln.startswith("+ ")]
    assert cmds and not [c for c in cmds if " torch" in c.replace("-c ", "")], cmds  # no torch install command
    assert any(".[demo,test]" in c for c in cmds), cmds
    assert f"install.sh: constraint: torch=={md.version('torch')}" in out


def test_install_sh_dry_run_with_torch_spec():
    proc = _install_sh("demo", env_extra={"INSTALL_DRY_RUN": "1", "TORCH_SPEC": "torch==2.11.0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "+ python -m pip install --disable-pip-version-check -q torch==2.11.0" in proc.stdout


def test_install_sh_bad_mode():
    proc = _install_sh("tset")
    assert proc.returncode == 2 and "unknown mode 'tset'" in proc.stderr
