#!/usr/bin/env bash
# The GPU suite: on a machine with a CUDA GPU and no network, builds rtllm with the CUDA backend, runs
# tests/gpu, the kernel benchmark and the end-to-end benchmark, and writes logs + JSON to OUT_DIR.
# Each step runs even when an earlier one failed; a summary table is printed last.
#
#   benchmarks/gpu_suite.sh OUT_DIR
#
# The serving step needs the serve extra (fastapi, uvicorn) importable; on a machine without network, put
# their wheels on PYTHONPATH first.
# Environment: STEPS (default "build tests kernels e2e serving"), CUDA_ARCHS (default 90a),
# E2E_ARGS (bench_e2e.py arguments replacing the default workloads), PYTHON (default python3).
set -u
OUT_DIR=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

STEPS=${STEPS:-build tests kernels e2e serving}
declare -a NAMES STATUS DURATIONS

wants() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME TIMEOUT_S LOG COMMAND...: runs COMMAND with its output in OUT_DIR/LOG.
run_step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local start=$SECONDS
  echo "== $name (log: $OUT_DIR/$log)"
  timeout "$limit" "$@" >"$OUT_DIR/$log" 2>&1
  local rc=$?
  NAMES+=("$name")
  STATUS+=("$([ $rc -eq 0 ] && echo ok || { [ $rc -eq 124 ] && echo "timeout" || echo "failed ($rc)"; })")
  DURATIONS+=("$((SECONDS - start))")
  tail -n 5 "$OUT_DIR/$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -n 1; } \
  >"$OUT_DIR/device.txt" 2>&1

wants build && CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-90a} -DRTLLM_CUDA=ON" \
  run_step build 300 build.log "$PYTHON" -m pip install --no-build-isolation --no-deps -v .

wants tests && run_step tests_gpu 300 tests_gpu.log "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_gpu.xml"

wants kernels && run_step bench_kernels 150 bench_kernels.log "$PYTHON" benchmarks/bench_kernels.py \
  --output "$OUT_DIR/kernels.json"

# Default workloads: 1,000 requests at 128/128, and 200 at 2048/2048 (the KV pool holds ~100 such requests;
# 1,000 of them take ~500 s on an H100: E2E_ARGS="--workload 2048x2048x1000 ..." runs that alone).
E2E_ARGS=${E2E_ARGS:---workload 128x128x1000 --workload 2048x2048x200 --max-batch-size 512 \
  --hf-requests 64 --hf-max-osl 128}
# shellcheck disable=SC2086
wants e2e && run_step bench_e2e 480 bench_e2e.log "$PYTHON" benchmarks/bench_e2e.py --preset llama-3-8b \
  --dtype bfloat16 --device cuda --output "$OUT_DIR/e2e.json" $E2E_ARGS

# rtllm bench throughput next to rtllm bench serve against rtllm serve, same model and workload.
wants serving && run_step bench_serving 420 bench_serving.log "$PYTHON" benchmarks/bench_serving.py \
  --preset llama-3-8b --dtype bfloat16 --device cuda --num-requests 1000 --input-len 128 --output-len 128 \
  --max-batch-size 256 --output "$OUT_DIR/serving.json"
wants serving && run_step bench_serving_c256 420 bench_serving_c256.log "$PYTHON" benchmarks/bench_serving.py \
  --preset llama-3-8b --dtype bfloat16 --device cuda --num-requests 1000 --input-len 128 --output-len 128 \
  --max-batch-size 256 --max-concurrency 256 --output "$OUT_DIR/serving_c256.json"

echo
echo "== summary ($(cat "$OUT_DIR/device.txt" | head -n 1))"
printf '%-14s %-12s %8s\n' step status seconds
for i in "${!NAMES[@]}"; do
  printf '%-14s %-12s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${DURATIONS[$i]}"
done
[ -f "$OUT_DIR/tests_gpu.log" ] && grep -E "passed|failed|error" "$OUT_DIR/tests_gpu.log" | tail -n 1
true
