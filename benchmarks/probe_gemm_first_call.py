"""What cuBLAS(Lt) charges the first time a GEMM runs at a row count the process has not run before.

rtllm makes one cuBLASLt plan per linear shape and token count, so a prefill of a length never seen (and
every mixed step of a new total) queries cuBLASLt's heuristic and may launch kernels no earlier step used,
which CUDA loads on first launch (lazy module loading). This times that with torch alone (no rtllm
build), on the Llama-3-8B linear shapes: for each token count, the first call and the mean of the next
few, bf16 (torch.matmul) and FP8 (torch._scaled_mm, per-tensor scales, the cuBLASLt path rtllm's FP8
linears take), with CUDA_MODULE_LOADING as the environment sets it.

  python benchmarks/probe_gemm_first_call.py [--tokens 67 101 127 128 6001 6007] [--output probe.json]
"""
import argparse
import json
import os
import time

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


def timed(torch, fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 127, 101, 67, 6001, 6007, 6013, 6500])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    import torch

    start = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    init_ms = (time.perf_counter() - start) * 1e3
    gen = torch.Generator(device="cuda").manual_seed(0)
    weights = {s: torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02 for s in SHAPES}
    fp8 = {s: w.to(torch.float8_e4m3fn) for s, w in weights.items()}
    one = torch.ones((), device="cuda")
    for (N, K), w in weights.items():  # handles and workspaces, at a row count not probed below
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=gen)
        torch.matmul(x, w.t())
        torch._scaled_mm(x.to(torch.float8_e4m3fn), fp8[(N, K)].t(), one, one, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    rows = []
    for T in args.tokens:
        for (N, K), w in weights.items():
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, generator=gen)
            xq = x.to(torch.float8_e4m3fn)
            for kind, fn in (("bf16", lambda: torch.matmul(x, w.t())),
                             ("fp8", lambda: torch._scaled_mm(xq, fp8[(N, K)].t(), one, one,
                                                              out_dtype=torch.bfloat16))):
                first = timed(torch, fn)
                again = sum(timed(torch, fn) for _ in range(args.repeats)) / args.repeats
                rows.append({"tokens": T, "N": N, "K": K, "kind": kind, "first_ms": first, "again_ms": again})
                print(f"T={T:5d} {N:5d}x{K:5d} {kind}: first {first:8.3f} ms, again {again:7.3f} ms", flush=True)
    result = {"module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default)"), "init_ms": init_ms,
              "device": torch.cuda.get_device_name(), "rows": rows}
    for kind in ("bf16", "fp8"):
        extra = [r["first_ms"] - r["again_ms"] for r in rows if r["kind"] == kind]
        print(f"{kind}: first call costs {sum(extra) / len(extra):.3f} ms more on average "
              f"(CUDA_MODULE_LOADING={result['module_loading']}, CUDA init {init_ms:.0f} ms)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
