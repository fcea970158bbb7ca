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
# E2E_ARGS (bench_e2e.py arguments replacing the default workloads), KERNELS_ARGS (bench_kernels.py
# arguments, e.g. --only sampling), FP8_KERNELS_ARGS (bench_fp8_gemm.py arguments, e.g. --only gemm), TESTS_GPU (the test files or nodes the
# tests step runs; default all of tests/gpu), PYTHON (default python3).
#
# STEPS may also name kernel_profile, decode_profile, fp8_kernels, fp8_prepare, fp8_e2e, woq_kernels, woq_prepare,
# woq_e2e and plans_ab (below).
#
# Same-machine A/B against another rtllm source tree (e.g. the previous main, `git archive` into a
# folder): STEPS="build ab_prepare ab" AB_BASE=DIR. ab_build builds DIR into AB_WORK/base (default
# AB_WORK=/tmp/rtllm-ab); ab_prepare also writes one Llama-3-8B-shaped engine with random bf16 weights (AB_BUILD_ARGS:
# more `rtllm build` flags, e.g. "--quant-algo FP8 --kv-cache-quant-algo FP8 --calib-size 16"); ab
# runs bench_e2e.py on that engine under the base build, then this one (AB_ARGS: its workloads; AB_ORDER:
# new-base or base-new-base for another order);
# ab_kernels runs bench_kernels.py (KERNELS_ARGS) under the base build into kernels_base.json; ab_woq runs
# bench_weight_only.py (WOQ_KERNELS_ARGS) under the base build and then this one (woq_base.json, woq_new.json).
set -u
OUT_DIR=${1:?usage: benchmarks/gpu_suite.sh OUT_DIR}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
# An absolute path, so that pip reads a relative AB_BASE as the folder it is and not as a package name.
if [ -n "${AB_BASE:-}" ]; then AB_BASE=$(cd "$AB_BASE" && pwd) || exit 1; fi
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

# shellcheck disable=SC2086
wants tests && run_step tests_gpu 480 tests_gpu.log "$PYTHON" -m pytest ${TESTS_GPU:-tests/gpu} -q -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_gpu.xml"

# shellcheck disable=SC2086
wants kernels && run_step bench_kernels 150 bench_kernels.log "$PYTHON" benchmarks/bench_kernels.py \
  --output "$OUT_DIR/kernels.json" ${KERNELS_ARGS:-}

# One kernel under Nsight Compute: NCU_PROGRAM (a Python script and its arguments; default the sampler at batch
# 256, top-p 0.95) runs, and launch NCU_SKIP (default 2) of the kernels matching NCU_KERNEL (a regex) is
# profiled with the full counter set and the source view; kernel_profile.ncu-rep opens in Nsight Compute,
# kernel_profile.txt holds its details page, kernel_profile_source.csv its source page (per SASS line:
# instructions executed, warp stall samples), for where the instructions of a kernel go.
NCU_PROGRAM=${NCU_PROGRAM:-benchmarks/profile_sampling.py --batch 256 --temperature 0.8 --top-p 0.95}
kernel_profile() {
  # shellcheck disable=SC2086
  ncu --kernel-name "regex:${NCU_KERNEL:-sample_kernel}" --launch-skip "${NCU_SKIP:-2}" --launch-count 1 \
    --set full --import-source yes -f -o "$OUT_DIR/kernel_profile" "$PYTHON" $NCU_PROGRAM &&
    ncu --import "$OUT_DIR/kernel_profile.ncu-rep" --page details >"$OUT_DIR/kernel_profile.txt" &&
    ncu --import "$OUT_DIR/kernel_profile.ncu-rep" --page source --print-source sass --csv \
      >"$OUT_DIR/kernel_profile_source.csv"
}
export -f kernel_profile
export NCU_PROGRAM NCU_KERNEL NCU_SKIP PYTHON OUT_DIR
wants kernel_profile && run_step kernel_profile 300 kernel_profile.log bash -c kernel_profile

# Where a decode step's time goes (device time by kernel, idle gaps, host time) at batch 1 and 256, greedy and
# top-p, on a random Llama-3-8B-shaped bf16 model (DECODE_PROFILE_ARGS replaces these arguments).
DECODE_PROFILE_ARGS=${DECODE_PROFILE_ARGS:---preset llama-3-8b --batch 1 --batch 256 --sampling greedy --sampling topp}
# shellcheck disable=SC2086
wants decode_profile && run_step decode_profile 300 decode_profile.log "$PYTHON" benchmarks/profile_decode.py \
  $DECODE_PROFILE_ARGS --output "$OUT_DIR/decode_profile.json"

# Default workloads: 1,000 requests at 128/128, greedy, then sampled with top-p and with top-k, and 200 at
# 2048/2048 (the KV pool holds ~100 such requests; 1,000 of them take ~500 s on an H100:
# E2E_ARGS="--workload 2048x2048x1000 ..." runs that alone).
E2E_ARGS=${E2E_ARGS:---workload 128x128x1000 --workload 128x128x1000:topp --workload 128x128x1000:topk \
  --workload 2048x2048x200 --max-batch-size 512 \
  --hf-requests 64 --hf-max-osl 128}
# shellcheck disable=SC2086
wants e2e && run_step bench_e2e 480 bench_e2e.log "$PYTHON" benchmarks/bench_e2e.py --preset llama-3-8b \
  --dtype bfloat16 --device cuda --output "$OUT_DIR/e2e.json" $E2E_ARGS

# rtllm bench throughput next to rtllm bench serve against rtllm serve, same model and workload, greedy
# and top-p.
wants serving && run_step bench_serving 600 bench_serving.log "$PYTHON" benchmarks/bench_serving.py \
  --preset llama-3-8b --dtype bfloat16 --device cuda --num-requests 1000 --input-len 128 --output-len 128 \
  --max-batch-size 256 --sampling greedy topp --output "$OUT_DIR/serving.json"
wants serving && run_step bench_serving_c256 600 bench_serving_c256.log "$PYTHON" benchmarks/bench_serving.py \
  --preset llama-3-8b --dtype bfloat16 --device cuda --num-requests 1000 --input-len 128 --output-len 128 \
  --max-batch-size 256 --max-concurrency 256 --sampling greedy topp --output "$OUT_DIR/serving_c256.json"

AB_WORK=${AB_WORK:-/tmp/rtllm-ab}
AB_ARGS=${AB_ARGS:---workload 128x128x1000 --workload 128x128x1000 --workload 128x128x1000:topp \
  --workload 128x128x5000 --workload 2048x2048x200}
ab_build() {  # skipped when the base is built (a machine kept between calls)
  mkdir -p "$AB_WORK" || return
  [ -d "$AB_WORK/base/rtllm" ] || CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS -DRTLLM_CUDA=ON" \
    "$PYTHON" -m pip install --no-build-isolation --no-deps --target "$AB_WORK/base" "${AB_BASE:?AB_BASE is unset}"
}
ab_prepare() {  # each part skipped when its output exists
  ab_build || return
  [ -f "$AB_WORK/engine/rank0.engine" ] && return
  # The base's builder writes the engine: a newer build reads older engine formats, not the reverse. A
  # checkpoint fp8_prepare left (same preset) serves and stays; one written here goes once the engine is built.
  local keep_hf=0
  [ -f "$AB_WORK/hf/config.json" ] && keep_hf=1
  # shellcheck disable=SC2086
  { [ $keep_hf = 1 ] || PYTHONPATH="$AB_WORK/base${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
    "from rtllm.models.presets import write_random_checkpoint as w; w('$AB_WORK/hf', 'llama-3-8b', dtype='bfloat16')"; } &&
    PYTHONPATH="$AB_WORK/base${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m rtllm.cli build "$AB_WORK/hf" -o "$AB_WORK/engine" \
      --max-batch-size 512 --max-input-len 2048 --max-seq-len 4096 --max-num-tokens 8192 ${AB_BUILD_ARGS:-} &&
    { [ $keep_hf = 1 ] || rm -rf "$AB_WORK/hf"; }
}
# AB_ORDER (base-new, new-base or base-new-base): the order of the runs. A card that drifts between two runs
# shows as a difference of builds; running the other order too (or the base again, into ab_base2.json) tells
# the two apart.
ab_base_run() {
  # shellcheck disable=SC2086
  PYTHONPATH="$AB_WORK/base${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/engine" \
    --device cuda --output "$OUT_DIR/$1" $AB_ARGS
}
ab_new_run() {
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/engine" --device cuda --output "$OUT_DIR/ab_new.json" $AB_ARGS
}
ab_run() {
  case "${AB_ORDER:-base-new}" in
    base-new) ab_base_run ab_base.json && ab_new_run ;;
    new-base) ab_new_run && ab_base_run ab_base.json ;;
    base-new-base) ab_base_run ab_base.json && ab_new_run && ab_base_run ab_base2.json ;;
    *) echo "AB_ORDER must be base-new, new-base or base-new-base, not '$AB_ORDER'" >&2; return 2 ;;
  esac
}
# The kernel benchmarks (KERNELS_ARGS) under the base build: their rows beside this build's kernels step.
ab_kernels() {
  # shellcheck disable=SC2086
  ab_build && PYTHONPATH="$AB_WORK/base${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_kernels.py \
    --output "$OUT_DIR/kernels_base.json" ${KERNELS_ARGS:-}
}
# The weight-only benchmark (WOQ_KERNELS_ARGS, e.g. --tokens 1,8) under the base build, then this build's.
ab_woq() {
  # shellcheck disable=SC2086
  ab_build && PYTHONPATH="$AB_WORK/base${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/bench_weight_only.py \
    --json "$OUT_DIR/woq_base.json" ${WOQ_KERNELS_ARGS:-} &&
    "$PYTHON" benchmarks/bench_weight_only.py --json "$OUT_DIR/woq_new.json" ${WOQ_KERNELS_ARGS:-}
}
export -f ab_build ab_prepare ab_base_run ab_new_run ab_run ab_kernels ab_woq
export AB_WORK AB_ARGS AB_BUILD_ARGS AB_ORDER="${AB_ORDER:-base-new}" PYTHON OUT_DIR KERNELS_ARGS WOQ_KERNELS_ARGS
export AB_BASE="${AB_BASE:-}" CUDA_ARCHS="${CUDA_ARCHS:-90a}"
wants ab_build && run_step ab_build 540 ab_build.log bash -c ab_build
wants ab_prepare && run_step ab_prepare 540 ab_prepare.log bash -c ab_prepare
wants ab_kernels && run_step ab_kernels 300 ab_kernels.log bash -c ab_kernels
wants ab_woq && run_step ab_woq 400 ab_woq.log bash -c ab_woq
wants ab && run_step ab 580 ab.log bash -c ab_run

# FP8 next to bf16 on one random Llama-3-8B-shaped checkpoint: the FP8 GEMM/GEMV kernel benchmark against
# torch._scaled_mm and the copy bandwidth, then bench_e2e.py on a bf16 engine and an FP8 + FP8-KV engine
# (quantize() with calibration) built from the same weights (FP8_ARGS: the workloads, and --max-batch-size to
# run below the engines' limit; FP8_PRESET: the shape; FP8_LIMITS: the engines' limits; FP8_BF16=0: the FP8
# engine alone).
FP8_ARGS=${FP8_ARGS:---workload 128x128x5000 --workload 128x128x5000:topp}
FP8_LIMITS=${FP8_LIMITS:---max-batch-size 512 --max-input-len 2048 --max-seq-len 4096 --max-num-tokens 8192}
FP8_BF16=${FP8_BF16:-1}
fp8_prepare() {
  mkdir -p "$AB_WORK" || return
  [ -f "$AB_WORK/hf/config.json" ] || "$PYTHON" -c \
    "from rtllm.models.presets import write_random_checkpoint as w; w('$AB_WORK/hf', '${FP8_PRESET:-llama-3-8b}', dtype='bfloat16')" ||
    return
  # shellcheck disable=SC2086
  [ -f "$AB_WORK/fp8/rank0.engine" ] || "$PYTHON" -m rtllm.cli build "$AB_WORK/hf" -o "$AB_WORK/fp8" $FP8_LIMITS \
    --quant-algo FP8 --kv-cache-quant-algo FP8 --calib-size "${FP8_CALIB_SIZE:-16}" || return
  # shellcheck disable=SC2086
  [ "$FP8_BF16" = 0 ] || [ -f "$AB_WORK/bf16/rank0.engine" ] ||
    "$PYTHON" -m rtllm.cli build "$AB_WORK/hf" -o "$AB_WORK/bf16" $FP8_LIMITS
}
fp8_run() {
  # shellcheck disable=SC2086
  { [ "$FP8_BF16" = 0 ] || "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/bf16" --device cuda --skip-hf \
    --output "$OUT_DIR/e2e_bf16.json" $FP8_ARGS; } &&
  "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/fp8" --device cuda --skip-hf --output "$OUT_DIR/e2e_fp8.json" \
    $FP8_ARGS
}
export -f fp8_prepare fp8_run
export FP8_ARGS FP8_LIMITS FP8_BF16
# shellcheck disable=SC2086
wants fp8_kernels && run_step fp8_kernels 300 fp8_kernels.log "$PYTHON" benchmarks/bench_fp8_gemm.py \
  --json "$OUT_DIR/fp8_kernels.json" ${FP8_KERNELS_ARGS:-}
# weight-only W4A16 / W8A16 linears (GEMV and dequantized GEMM) against torch bf16 and the copy bandwidth
wants woq_kernels && run_step woq_kernels 300 woq_kernels.log "$PYTHON" benchmarks/bench_weight_only.py \
  --json "$OUT_DIR/woq_kernels.json"
wants fp8_prepare && run_step fp8_prepare 540 fp8_prepare.log bash -c fp8_prepare
wants fp8_e2e && run_step fp8_e2e 580 fp8_e2e.log bash -c fp8_run

# Weight-only INT4 next to bf16 on the same random checkpoint as the FP8 steps: WOQ_ALGO (default W4A16,
# round to nearest, group WOQ_GROUP_SIZE 128) needs no calibration, so its engine builds in seconds; the
# kernels are those AWQ and GPTQ engines run. WOQ_ARGS: the workloads (batch-1 TPOT is always measured).
WOQ_ARGS=${WOQ_ARGS:---workload 128x128x5000 --workload 128x128x1000:topp}
woq_prepare() {
  mkdir -p "$AB_WORK" || return
  [ -f "$AB_WORK/hf/config.json" ] || "$PYTHON" -c \
    "from rtllm.models.presets import write_random_checkpoint as w; w('$AB_WORK/hf', '${FP8_PRESET:-llama-3-8b}', dtype='bfloat16')" ||
    return
  local limits="--max-batch-size 512 --max-input-len 2048 --max-seq-len 4096 --max-num-tokens 8192"
  # shellcheck disable=SC2086
  [ -f "$AB_WORK/woq/rank0.engine" ] || "$PYTHON" -m rtllm.cli build "$AB_WORK/hf" -o "$AB_WORK/woq" $limits \
    --quant-algo "${WOQ_ALGO:-W4A16}" --group-size "${WOQ_GROUP_SIZE:-128}" || return
  # shellcheck disable=SC2086
  [ -f "$AB_WORK/bf16/rank0.engine" ] || "$PYTHON" -m rtllm.cli build "$AB_WORK/hf" -o "$AB_WORK/bf16" $limits
}
woq_run() {
  # shellcheck disable=SC2086
  "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/bf16" --device cuda --skip-hf --output "$OUT_DIR/e2e_bf16.json" \
    $WOQ_ARGS &&
  "$PYTHON" benchmarks/bench_e2e.py --model "$AB_WORK/woq" --device cuda --skip-hf --output "$OUT_DIR/e2e_woq.json" \
    $WOQ_ARGS
}
export -f woq_prepare woq_run
export WOQ_ARGS
wants woq_prepare && run_step woq_prepare 540 woq_prepare.log bash -c woq_prepare
wants woq_e2e && run_step woq_e2e 580 woq_e2e.log bash -c woq_run

# cuBLASLt's plans by buckets of row counts (RTLLM_CUBLASLT_BUCKETS=1) against one heuristic answer per row
# count, same build and engine (PLANS_ENGINE, default the FP8 engine fp8_prepare writes), in the order
# buckets, exact, buckets, each a fresh process (PLANS_ARGS: the workloads): plans_b1.json, plans_b0.json,
# plans_b1_again.json.
PLANS_ARGS=${PLANS_ARGS:---workload 128x128x5000 --max-batch-size 1024}
plans_run() {
  local engine=${PLANS_ENGINE:-$AB_WORK/fp8} out
  for out in b1 b0 b1_again; do
    # shellcheck disable=SC2086
    RTLLM_CUBLASLT_BUCKETS=${out:1:1} "$PYTHON" benchmarks/bench_e2e.py --model "$engine" --device cuda --skip-hf \
      --output "$OUT_DIR/plans_$out.json" $PLANS_ARGS || return
  done
}
export -f plans_run
export PLANS_ARGS PLANS_ENGINE="${PLANS_ENGINE:-}"
wants plans_ab && run_step plans_ab 580 plans_ab.log bash -c plans_run

echo
echo "== summary ($(cat "$OUT_DIR/device.txt" | head -n 1))"
printf '%-14s %-12s %8s\n' step status seconds
for i in "${!NAMES[@]}"; do
  printf '%-14s %-12s %8s\n' "${NAMES[$i]}" "${STATUS[$i]}" "${DURATIONS[$i]}"
done
[ -f "$OUT_DIR/tests_gpu.log" ] && grep -E "passed|failed|error" "$OUT_DIR/tests_gpu.log" | tail -n 1
true
