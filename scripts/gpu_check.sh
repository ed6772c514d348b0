#!/usr/bin/env bash
# One GPU check of everything that needs a GPU, sized for one H200 (16 cores, torch 2.11+cu130, triton 3.6, no
# network): about 8 minutes wall, including the extension build. Run from anywhere:
#
#   bash scripts/gpu_check.sh            # all steps
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Budget (seconds, each step killed by `timeout` at its budget; a failing or killed step does not stop the others):
#   env        20   nvidia-smi, nvcc, torch / triton / GPU
#   build     130   pip install --no-build-isolation --no-deps -e .  (TORCH_CUDA_ARCH_LIST=9.0a, MAX_JOBS=16)
#   ext        25   the extension loads, every op registers a cuda implementation
#   parity    105   the op test files' @gpu rows at the full InternViT-6B / projector / W4 GEMM shapes, backends
#                   triton and cuda (a missing extension fails, it is not skipped)
#   parity_gpu 45   the other @pytest.mark.gpu parity tests at full shapes (Triton; all three dtypes)
#   memcheck   40   compute-sanitizer --tool memcheck on one call of each CUDA kernel (scripts/cuda_smoke.py)
#   bench      70   the kernel rows against their baselines (eager, SDPA cuDNN / flash, cuBLAS bf16), CUDA-event
#                   timing -> bench/results/<gpu>-<date>.json + .md
#   quantize   45   bench/gpu_quantize_vit6b.py on 4 full-width InternViT-6B blocks (GPTQ W4 g128, real photos):
#                   time, GPU peak memory, feature SQNR, and the 45-block time projected from the per-block seconds
#   total     480   (+ a few seconds for the summary and the log tarball)
#
# Output, all under $OUT (default: ./gpu_check_out), at most 6 files, no sub-folders:
#   summary.txt          one line per step: ok / FAILED (rc) / TIMEOUT, seconds used of its budget
#   logs.tar.gz          every step's log and the pytest junit XML files
#   <gpu>-<date>.json/.md  the bench results (also left in bench/results/)
#   gpu_quantize_vit6b.json  the quantize step's result (also in bench/results/)
# Exit status: the number of steps that did not pass.
# Environment: PYTHON (default python3), OUT, GPU_CHECK_STEPS (space-separated subset of the steps above).
set -u
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}

# ---------------------------------------------------------------------------------------------- selections
# full-shape parity on both backends (the @gpu rows of each op's own test file, parametrized over triton / cuda;
# -k selects the large / model shapes, the small odd shapes run too where they are cheap)
PARITY_FILES=(
  "tests/test_rms_norm.py"
  "tests/test_layer_norm.py"
  "tests/test_add_rms_norm.py"
  "tests/test_add_layer_norm.py"
  "tests/test_attention.py"
  "tests/test_qk_norm_attention.py"
  "tests/test_pixel_shuffle.py"
  "tests/test_mlp_projector.py"
  "tests/test_quant_matmul.py"
)
PARITY_K="3200 or 12800 or 1025 or 5120 or 6144 or 13824 or strided or internvit or llm_shapes or routes"
# other GPU-only parity tests at full shapes (Triton)
PARITY_GPU_NODES=(
  "tests/test_attention.py::test_attention_full_shapes"
  "tests/test_mlp_projector.py::test_mlp_projector_full_shapes"
  "tests/test_quant_matmul.py::test_gpu_fp16_and_fp32_and_split_k_determinism"
)
# bench rows: each kernel against its baselines, InternViT-6B / projector / W4 GEMM shapes
BENCH_NODES=(
  "bench/bench_rms_norm.py::test_rms_norm"
  "bench/bench_layer_norm.py::test_layer_norm"
  "bench/bench_add_rms_norm.py::test_add_rms_norm"
  "bench/bench_add_layer_norm.py::test_add_layer_norm"
  "bench/bench_attention.py::test_attention"
  "bench/bench_qk_norm_attention.py::test_qk_norm_attention"
  "bench/bench_pixel_shuffle.py::test_pixel_shuffle_layer_norm"
  "bench/bench_mlp_projector.py::test_mlp_projector"
  "bench/bench_attention.py::test_attention_cuda"
  "bench/bench_qk_norm_attention.py::test_qk_norm_attention_cuda"
  "bench/bench_pixel_shuffle.py::test_pixel_shuffle_cuda"
  "bench/bench_pixel_shuffle.py::test_pixel_shuffle_layer_norm_cuda"
  "bench/bench_mlp_projector.py::test_mlp_projector_cuda"
  "bench/bench_quant_matmul.py::test_quant_matmul_gpu"
  "bench/bench_quant_matmul.py::test_bf16_matmul_gpu"
)
# quant_matmul rows: M = 1, 16, 128 on the LLaMA2-13B MLP shapes, GPTQ 4-bit (and their bf16 baselines)
# (ids: test_quant_matmul_gpu[<impl>-<shape>-<M>-<format>], test_bf16_matmul_gpu[<shape>-<M>])
BENCH_K="not (matmul_gpu and (qkv_ or fc1_ or fc2_ or qkvo_ or awq4 or gptq8 or -4- or -64- or -1024- or -4] or -64] or -1024]))"

# --------------------------------------------------------------------------------------------------- steps
step_env() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -2
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, 'gpu', torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
}

step_build() {
  export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -v "^ *\(copying\|adding\)" | tail -60
  return "${PIPESTATUS[0]}"
}

step_ext() {
  "$PY" - <<'EOF'
import sys
from internvl_kernels import _backend, ops
from internvl_kernels.ops import _cuda
print(_cuda.status())
missing = [op for op in _cuda.OPS if "cuda" not in _backend.available_impls(op)] if _cuda.available() else ["all"]
print("ops with a cuda implementation:", [op for op in ops.OPS if "cuda" in _backend.available_impls(op)])
sys.exit(1 if missing else 0)
EOF
}

step_parity() {
  INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1 "$PY" -m pytest "${PARITY_FILES[@]}" -m gpu -k "($PARITY_K) and not (full_shapes or fp16_and_fp32)" -q -ra --maxfail=20 \
    -p no:cacheprovider --junitxml="$LOGS/parity.xml"
}

step_parity_gpu() {
  "$PY" -m pytest "${PARITY_GPU_NODES[@]}" -q -ra -p no:cacheprovider --junitxml="$LOGS/parity_gpu.xml"
}

step_memcheck() {
  local cs
  cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"; return 1; fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$cs" --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PY" scripts/cuda_smoke.py
}

step_bench() {
  INTERNVL_BENCH_RESULTS="$ROOT/bench/results" "$PY" -m pytest "${BENCH_NODES[@]}" -k "$BENCH_K" --benchmark-only -q \
    -p no:cacheprovider --benchmark-columns=median,rounds
  local rc=$?
  local newest
  for ext in json md; do
    newest=$(ls -t bench/results/*-20*."$ext" 2>/dev/null | head -1)
    [ -n "$newest" ] && cp "$newest" "$OUT/"
  done
  return $rc
}

step_quantize() {
  "$PY" bench/gpu_quantize_vit6b.py --layers 4 --images 3 --max-tiles 4 --out "$ROOT/bench/results" --no-progress
  local rc=$?
  [ -f bench/results/gpu_quantize_vit6b.json ] && cp bench/results/gpu_quantize_vit6b.json "$OUT/"
  return $rc
}

run_step() {  # name budget_seconds
  local name=$1 budget=$2 t0=$SECONDS rc status
  echo "=== [$(date +%T)] $name (budget ${budget}s)"
  # the step runs in a child bash (so `timeout` can kill it and its processes) with this file's functions
  timeout -k 10 "$budget" bash -c "source '$ROOT/scripts/gpu_check.sh' --functions-only; step_$name" \
    >"$LOGS/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then status=ok; elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status=TIMEOUT; else status="FAILED (rc $rc)"; fi
  [ $rc -eq 0 ] || failed=$((failed + 1))
  printf '%-11s %-16s %4ds of %4ds\n' "$name" "$status" $((SECONDS - t0)) "$budget" | tee -a "$SUMMARY"
  tail -5 "$LOGS/$name.log" | sed 's/^/    /'
}

# sourced by run_step's child: define the functions and stop here
if [ "${1:-}" = "--functions-only" ]; then
  # shellcheck disable=SC2317
  return 0 2>/dev/null || exit 0
fi

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
mkdir -p "$OUT" bench/results
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
T_START=$SECONDS
failed=0
export PY ROOT OUT LOGS

STEPS=${GPU_CHECK_STEPS:-"env build ext parity parity_gpu memcheck bench quantize"}
for s in $STEPS; do
  case $s in
    env) run_step env 20 ;;
    build) run_step build 130 ;;
    ext) run_step ext 25 ;;
    parity) run_step parity 105 ;;
    parity_gpu) run_step parity_gpu 45 ;;
    memcheck) run_step memcheck 40 ;;
    bench) run_step bench 70 ;;
    quantize) run_step quantize 45 ;;
    *) echo "unknown step $s"; failed=$((failed + 1)) ;;
  esac
done

echo "total $((SECONDS - T_START))s, $failed step(s) not ok" | tee -a "$SUMMARY"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
rm -rf "$LOGS"
exit "$failed"
