"""scripts/gpu_check.sh on the CPU: it parses (``bash -n``), every test / bench node it names exists and its ``-k``
selections pick the rows they are meant to (so renames can't rot it), its budgets add up to at most 8 minutes, and
it fails soft: a failing step is reported in summary.txt and the run goes on to the end (logs tarball written)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
TEXT = open(SCRIPT).read()


def _array(name: str) -> list:
    m = re.search(rf"^{name}=\((.*?)^\)", TEXT, re.S | re.M)
    assert m, f"{name}=( ... ) not found in gpu_check.sh"
    return re.findall(r'"([^"]+)"', m.group(1))


def _var(name: str) -> str:
    m = re.search(rf'^{name}="?([^"\n]*)"?$', TEXT, re.M)
    assert m, f"{name}= not found in gpu_check.sh"
    return m.group(1)


def _collect(nodes, k=None) -> list:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *nodes]
    if k:
        cmd += ["-k", k]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"collection of {nodes} (-k {k!r}) failed:\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}"
    return [ln for ln in r.stdout.splitlines() if "::" in ln]


def test_bash_syntax():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "error", SCRIPT], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def test_budget_fits_eight_minutes():
    budgets = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+(\w+)\) run_step \1 (\d+) ;;", TEXT, re.M)}
    assert set(budgets) == {"env", "build", "ext", "parity", "parity_gpu", "memcheck", "bench", "quantize"}
    assert sum(budgets.values()) <= 480, budgets
    for name, sec in budgets.items():  # the documented table says the same
        assert re.search(rf"^#   {name}\s+{sec}\s", TEXT, re.M), f"budget of {name} ({sec}s) not in the header"
    assert "TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16" in TEXT and "--no-build-isolation --no-deps -e ." in TEXT


def test_named_files_exist():
    files = _array("PARITY_FILES") + ["scripts/cuda_smoke.py"] + [n.split("::")[0] for n in
                                                                  _array("PARITY_GPU_NODES") + _array("BENCH_NODES")]
    for f in files:
        assert os.path.isfile(os.path.join(ROOT, f)), f"gpu_check.sh names {f}, which does not exist"


def test_parity_selection_collects():
    got = _collect(_array("PARITY_FILES"), f'{_var("PARITY_K")}')
    names = "\n".join(got)
    for want in ("test_attention_internvit_6b_full", "test_quant_matmul_llm_shapes", "test_pixel_shuffle_layer_norm",
                 "test_pixel_shuffle_strided_cls_view", "test_mlp_projector", "test_rms_norm", "test_qk_norm_attention"):
        assert want in names, f"the parity selection lost {want}"
    for kn in ("5120, 13824", "13824, 5120", "6144, 6144"):  # W4 GEMM, both backends, M = 1, 16, 128
        for m in (1, 16, 128):
            for be in ("triton", "cuda"):
                node = f"tests/test_quant_matmul.py::test_quant_matmul_llm_shapes[{be}-{m}-({kn})]"
                assert node in got, f"{node} is not selected"


def test_parity_gpu_nodes_collect():
    nodes = _array("PARITY_GPU_NODES")
    got = _collect(nodes)
    for n in nodes:
        assert any(g.startswith(n) for g in got), f"{n} collects nothing"


def test_bench_selection_collects():
    nodes = _array("BENCH_NODES")
    got = _collect(nodes, _var("BENCH_K"))
    for n in nodes:
        assert any(g.startswith(n) for g in got), f"{n} collects nothing under the -k selection"
    qmm = [g for g in got if "test_quant_matmul_gpu" in g]
    bf16 = [g for g in got if "test_bf16_matmul_gpu" in g]
    # 2 impls x 2 LLaMA2-13B MLP shapes x M in {1, 16, 128}, GPTQ 4-bit; their bf16 baselines
    assert len(qmm) == 12 and all("gptq4" in g for g in qmm), qmm
    assert sorted(g.split("[")[1] for g in bf16) == sorted(
        f"{s}-{m}]" for s in ("gate_up_5120x13824", "down_13824x5120") for m in (1, 16, 128)), bf16
    assert sum("test_attention[" in g and "sdpa-cudnn" in g for g in got) == 2  # both shapes, cuDNN SDPA baseline
    assert sum("test_attention[" in g and "sdpa-flash" in g for g in got) == 2


def test_fails_soft_and_writes_summary(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON="false", GPU_CHECK_STEPS="env ext", PATH=os.environ["PATH"])
    r = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr  # both steps fail (no GPU, no python), both ran
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("env") and summary[1].startswith("ext") and "not ok" in summary[-1]
    assert all(("FAILED" in ln or "TIMEOUT" in ln) for ln in summary[:2])
    with tarfile.open(out / "logs.tar.gz") as t:
        assert {"./env.log", "./ext.log"} <= set(t.getnames())
    assert len(list(out.iterdir())) <= 8


@pytest.mark.parametrize("path", ["README.md"])
def test_readme_points_to_gpu_check(path):
    assert "scripts/gpu_check.sh" in open(os.path.join(ROOT, path)).read()
