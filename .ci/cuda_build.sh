#!/usr/bin/env bash
# CI: the GPU user's install path, built for real on a machine without a GPU (nvcc on PATH is enough).
#   1. a fresh venv with the CUDA torch a user gets today: pip install torch==2.14.1 (CUDA 13.0)
#   2. README's installer (scripts/install.sh test) -- it must keep that torch (and its triton)
#   3. README's one-line CUDA build for sm_80 + sm_90a: pip install --no-build-isolation --no-deps .
#   4. python -m internvl_kernels --require-cuda-ext (when the CLI is in the tree) and a direct check: the extension
#      imports, reports its build, and internvl_kernels.ops._cuda registers all 10 ops
#   5. the setup / installer / compile / loader tests in that environment, the extension required
# Wall time on the 2-core CI machine: ~2 min venv + torch, ~1-2 min installer, ~2 min build with MAX_JOBS=2 on free
# cores (7 min and more when the cores are shared), ~2-4 min tests. Each step prints its own time.
# Environment: CUDA_CI_VENV (default .ci-venv-cu), CUDA_CI_TORCH (default torch==2.14.1),
# CUDA_CI_ARCHS (default "8.0;9.0a"), MAX_JOBS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${CUDA_CI_VENV:-.ci-venv-cu}
TORCH=${CUDA_CI_TORCH:-torch==2.14.1}
ARCHS=${CUDA_CI_ARCHS:-8.0;9.0a}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_NO_INPUT=1
start=$(date +%s)
step_start=$start
step() {
  local now; now=$(date +%s)
  echo "=== cuda_build: [+$(( now - start )) s, previous step $(( now - step_start )) s] $*"
  step_start=$now
}

if ! command -v nvcc >/dev/null 2>&1; then
  echo "cuda_build: nvcc is not on PATH; this step builds the CUDA extension and needs the CUDA toolkit" >&2
  exit 1
fi

step "fresh venv $VENV, pip install $TORCH"
rm -rf "$VENV"
python3 -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --disable-pip-version-check -q "$TORCH"
python - <<'PY'
import torch
assert torch.version.cuda, f"torch {torch.__version__} has no CUDA"
print(f"cuda_build: torch {torch.__version__} (CUDA {torch.version.cuda})")
PY
torch_before=$(python -c "import torch; print(torch.__version__, torch.version.cuda)")

step "README's installer: bash scripts/install.sh test"
bash scripts/install.sh test
torch_after=$(python -c "import torch; print(torch.__version__, torch.version.cuda)")
if [ "$torch_after" != "$torch_before" ]; then
  echo "cuda_build: FAIL: the installer replaced torch $torch_before with $torch_after" >&2
  exit 1
fi
echo "cuda_build: the installer kept torch $torch_after"

step "README's CUDA build: TORCH_CUDA_ARCH_LIST=\"$ARCHS\" MAX_JOBS=$MAX_JOBS pip install --no-build-isolation --no-deps ."
rm -rf build  # no object files from an earlier build: this step measures (and tests) a clean build
TORCH_CUDA_ARCH_LIST="$ARCHS" python -m pip install --disable-pip-version-check -v --no-build-isolation --no-deps . \
  > "$VENV/cuda_build.log" 2>&1 || { tail -n 80 "$VENV/cuda_build.log"; echo "cuda_build: FAIL: the build failed" >&2; exit 1; }
grep "internvl-kernels setup:" "$VENV/cuda_build.log" | sort -u
grep -q "internvl-kernels setup: building the CUDA extension" "$VENV/cuda_build.log" \
  || { tail -n 40 "$VENV/cuda_build.log"; echo "cuda_build: FAIL: setup.py skipped the extension" >&2; exit 1; }
grep -E "^\s*\[[0-9]+/[0-9]+\]" "$VENV/cuda_build.log" | grep -o -- "-std=c++[0-9]*" | sort | uniq -c \
  | sed 's/^/cuda_build: C++ standard chosen by torch: /'

step "the installed package (outside the source tree): python -m internvl_kernels --require-cuda-ext + direct check"
site=$(cd / && python -c "import internvl_kernels, os; print(os.path.dirname(internvl_kernels.__file__))")
if [ "$site" = "$ROOT/internvl_kernels" ]; then
  echo "cuda_build: FAIL: imported the source tree ($site), not the install" >&2; exit 1
fi
if [ -f "$site/__main__.py" ]; then
  (cd / && python -m internvl_kernels --require-cuda-ext)
else
  echo "cuda_build: internvl_kernels/__main__.py (the status CLI) is not in this tree; only the direct check runs"
fi
(cd / && python - <<'PY'
import torch
import internvl_kernels._C as C
from internvl_kernels.ops import _cuda

print(f"cuda_build: {C.__file__}")
print(f"cuda_build: build_info {C.build_info()}")
print(f"cuda_build: {_cuda.status()}")
assert _cuda.available(), _cuda.status()
assert len(_cuda.OPS) == 10 and set(_cuda._registered) == set(_cuda.OPS), _cuda._registered
missing = [op for op in _cuda.OPS if not hasattr(torch.ops.internvl_kernels_cuda, op)]
assert not missing, f"ops not registered: {missing}"
print(f"cuda_build: all {len(_cuda.OPS)} ops registered: {', '.join(_cuda.OPS)}")
PY
)

step "setup / installer / compile / loader tests with the built extension"
# pytest imports the source tree (the root conftest puts it first on sys.path): give it the extension just built.
so=$(ls "$site"/_C*.so)
cp "$so" internvl_kernels/
trap 'rm -f "$ROOT"/internvl_kernels/_C*.so' EXIT
INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1 python -m pytest -q -p no:cacheprovider \
  tests/test_setup_logic.py tests/test_install_plan.py tests/test_csrc_compile.py tests/test_cuda_wrappers.py \
  tests/test_cuda_ext_build.py tests/test_backend.py
step "done"
echo "cuda_build finished in $(( $(date +%s) - start )) s"
