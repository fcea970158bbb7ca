"""One quantized linear (the op's own code path at that batch size), launched a few times for a kernel
profiler to read; bench_weight_only.py and bench_fp8_gemm.py run every configuration, this runs one:

  ncu --kernel-name "regex:gemv_kernel" --launch-skip 3 --launch-count 1 --set full --import-source yes \
      -o woq python benchmarks/profile_linear.py --kind w4a16 --m 1 --n 28672 --k 4096

Successive calls read different copies of the weight (more bytes than the L2 holds), as a model's layers
do. Prints the mean time of the calls after the first.
"""
import argparse

import torch

import bench_fp8_gemm
import bench_weight_only

KINDS = {  # name: a function (M, N, K) -> one call
    "w4a16": lambda m, n, k: bench_weight_only.rtllm_call(m, n, k, True, 128, False)[0],
    "w4a16_offset": lambda m, n, k: bench_weight_only.rtllm_call(m, n, k, True, 128, True)[0],
    "w8a16": lambda m, n, k: bench_weight_only.rtllm_call(m, n, k, False, k, False)[0],
    "fp8": lambda m, n, k: bench_fp8_gemm.rtllm_call(m, n, k, False),
    "fp8_per_token": lambda m, n, k: bench_fp8_gemm.rtllm_call(m, n, k, True),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=sorted(KINDS), default="w4a16")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--n", type=int, default=28672)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--calls", type=int, default=6)
    args = p.parse_args()
    call = KINDS[args.kind](args.m, args.n, args.k)
    times = []
    for _ in range(args.calls):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    mean = sum(times[1:]) / max(len(times) - 1, 1)
    print(f"{args.kind} m={args.m} {args.n}x{args.k}: {mean:.1f} us per call (mean of {len(times) - 1} after the "
          "first)")


if __name__ == "__main__":
    main()
