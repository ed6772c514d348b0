#!/usr/bin/env bash
# GPU verification of the CUDA backend (issue 6) in one go, on a machine with an NVIDIA GPU (sm_80+), nvcc and a
# CUDA build of torch; works offline.
#
#   scripts/gpu_cuda_check.sh [all|build|parity|sanitize|bench] ...
#
#   build     pip install --no-build-isolation --no-deps -e .   (the extension internvl_kernels._C), then import it
#   parity    the GPU rows of every op's tests/test_<op>.py (backends triton and cuda; a missing extension fails)
#   sanitize  compute-sanitizer memcheck on one run of every kernel (scripts/cuda_smoke.py), racecheck and
#             synccheck on the shared-memory kernels (attention, quant_matmul)
#   bench     pytest bench/ --benchmark-only: eager / Triton / SDPA / CUDA rows side by side; raw JSON and a
#             markdown summary (device, versions, medians, GB/s, TFLOP/s, fraction of the ceiling) in bench/results/
#
# Steps can be given in any order and combination (each one is < 10 minutes on an H100). Environment:
#   PYTHON (default python3), TORCH_CUDA_ARCH_LIST (default: the visible GPU), MAX_JOBS (default: nproc),
#   BENCH_PATHS (default bench/; e.g. "bench/bench_rms_norm.py bench/bench_attention.py" to split the bench step into
#   runs under 10 minutes), BENCH_ARGS (extra pytest args, e.g. "-k 'not vit_patched'"), RESULTS (bench/results).
# Logs go to $RESULTS/gpu_cuda_check_<step>.log. Exit status: number of failed steps.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-bench/results}
mkdir -p "$RESULTS"
STAMP=$(date +%Y%m%d-%H%M%S)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
[ "${steps[0]}" = all ] && steps=(build parity sanitize bench)
failed=0

log() { echo "=== [$(date +%T)] $*"; }

env_report() {
  log "environment"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -4
  nvcc --version 2>&1 | tail -2
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
}

step_build() {
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  log "build: pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<visible GPU>}, MAX_JOBS=$MAX_JOBS)"
  local t0=$SECONDS
  "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  log "build took $((SECONDS - t0)) s"
  "$PY" -m internvl_kernels --require-cuda-ext || return 1
}

PARITY_FILES="tests/test_rms_norm.py tests/test_layer_norm.py tests/test_add_rms_norm.py tests/test_add_layer_norm.py
  tests/test_pixel_shuffle.py tests/test_mlp_projector.py tests/test_linear.py tests/test_attention.py
  tests/test_qk_norm_attention.py tests/test_quant_matmul.py"

step_parity() {
  log "parity: the GPU rows of each op's tests over backends triton, cuda"
  # shellcheck disable=SC2086
  INTERNVL_KERNELS_REQUIRE_CUDA_EXT=1 "$PY" -m pytest $PARITY_FILES -m gpu -q -ra \
    --junitxml="$RESULTS/gpu_cuda_parity_$STAMP.xml"
}

step_sanitize() {
  if ! command -v compute-sanitizer >/dev/null; then
    echo "compute-sanitizer not found"; return 1
  fi
  local rc=0
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # each tensor its own allocation: OOB is not hidden in a pool block
  log "compute-sanitizer memcheck: every kernel once"
  compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 "$PY" scripts/cuda_smoke.py || rc=1
  log "compute-sanitizer racecheck: attention, quant_matmul (shared memory)"
  compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 99 --print-limit 20 \
    "$PY" scripts/cuda_smoke.py --only attention,quant_matmul || rc=1
  log "compute-sanitizer synccheck: attention, quant_matmul, norms"
  compute-sanitizer --tool synccheck --error-exitcode 99 --print-limit 20 \
    "$PY" scripts/cuda_smoke.py --only attention,quant_matmul,norms || rc=1
  log "compute-sanitizer initcheck: every kernel once (reads of uninitialized device memory)"
  compute-sanitizer --tool initcheck --error-exitcode 99 --print-limit 20 "$PY" scripts/cuda_smoke.py || rc=1
  return $rc
}

step_bench() {
  local gpu
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '_' | tr -d '\n')
  local json="$RESULTS/bench_${STAMP}_${gpu:-gpu}.json"
  local md="$RESULTS/bench_${STAMP}_${gpu:-gpu}.md"
  log "bench: pytest bench/ --benchmark-only -> $json, $md"
  # shellcheck disable=SC2086
  "$PY" -m pytest ${BENCH_PATHS:-bench/} --benchmark-only -q ${BENCH_ARGS:-} --benchmark-json="$json" \
    --benchmark-columns=median,iqr,rounds 2>&1 | tee "$RESULTS/bench_${STAMP}_terminal.txt"
  local rc=${PIPESTATUS[0]}
  "$PY" - "$json" "$md" <<'EOF'
import json, sys
src, dst = sys.argv[1], sys.argv[2]
data = json.load(open(src))
rows = data.get("benchmarks", [])
if not rows:
    sys.exit("no benchmark rows")
e0 = rows[0]["extra_info"]
out = [f"# Benchmarks: eager / Triton / CUDA side by side\n",
       f"device: {e0.get('device')} | torch {e0.get('torch')} | triton {e0.get('triton')} | CUDA {e0.get('cuda')}  ",
       f"ceilings measured in this run: copy {e0.get('ceiling_copy_gbps')} GB/s (read+write), "
       f"bf16 matmul {e0.get('ceiling_matmul_tflops')} TFLOP/s\n",
       "| group | benchmark | impl | shapes | median ms | GB/s | % copy | TFLOP/s | % matmul |",
       "|---|---|---|---|---:|---:|---:|---:|---:|"]
def f(v, pct=False):
    if v is None: return "-"
    return f"{100*v:.1f}" if pct else f"{v:.2f}"
for b in sorted(rows, key=lambda b: (b.get("group") or "", b["name"])):
    e = b["extra_info"]
    out.append(f"| {b.get('group')} | {b['name']} | {e.get('impl')} | {e.get('shapes')} | "
               f"{b['stats']['median']*1e3:.3f} | {f(e.get('gbps'))} | {f(e.get('frac_copy_bw'), True)} | "
               f"{f(e.get('tflops'))} | {f(e.get('frac_matmul_peak'), True)} |")
open(dst, "w").write("\n".join(out) + "\n")
print(f"wrote {dst} ({len(rows)} rows)")
EOF
  return "$rc"
}

env_report 2>&1 | tee "$RESULTS/gpu_cuda_check_env.log"
for s in "${steps[@]}"; do
  case "$s" in
    build|parity|sanitize|bench)
      "step_$s" 2>&1 | tee "$RESULTS/gpu_cuda_check_$s.log"
      rc=${PIPESTATUS[0]}
      if [ "$rc" -ne 0 ]; then log "step $s FAILED (rc=$rc)"; failed=$((failed + 1)); else log "step $s ok"; fi
      ;;
    *) echo "unknown step $s (all|build|parity|sanitize|bench)"; failed=$((failed + 1)) ;;
  esac
done
log "done: $failed failed step(s)"
exit "$failed"
