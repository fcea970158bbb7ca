"""FP8 linears on CUDA: rtllm's fp8_linear (rtllm._core.kernels.fp8_linear, the op's code path: activation
quantization included) against the device's copy bandwidth at decode sizes and torch._scaled_mm at prefill
sizes, on pre-quantized operands (the GEMM alone) and on bf16 x that torch quantizes first (the whole op). CUDA events, warmup, median of repeats.

    python benchmarks/bench_fp8_gemm.py [--json OUT] [--only gemv|gemm]

On compute capability 9.0 the GEMM rows also give rtllm's Hopper FP8 GEMM (path 3) and cuBLASLt's (path 2)
separately, with per-token rows from M = 64, the measurements behind the op's choice between them
(kHopperGemmMinTiles / kHopperGemmMaxTiles in cuda_fp8_linear.cc).

The "codes" rows give the op x as E4M3 codes with static scales, as an FP8 engine's linears get it from
their producers (passes.fuse_fp8_input_quantization): no quantize kernel runs, so they time the GEMV or
the GEMM alone, against the copy bandwidth and against torch._scaled_mm (per tensor) on the same shapes.
"""
import argparse
import json

import torch
from bench_e2e import copy_bandwidth_GBps  # the copy bandwidth as the end-to-end floor measures it

from rtllm import _core

K = _core.kernels
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)]  # (N, K)


def median_ms(fn, warmup=3, repeats=25, calls=20):
    """Median time of one call: `calls` back-to-back calls captured in a CUDA graph (so host-side launch
    overhead does not count, as in a decode step's graph), replayed `repeats` times."""
    for _ in range(warmup):
        fn()  # also builds the cuBLASLt plans outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    times.sort()
    return times[len(times) // 2]


L2_BYTES = 50 * 2**20  # the H200's L2: the weights cycled through must not stay in it


def rtllm_call(M, N, Kd, per_token, path=0, codes=False):
    """One fp8_linear call per invocation; successive calls read different copies of the weight (more
    bytes in all than the L2 holds), so every call streams its weight from HBM as a model's layers do.
    codes: x holds E4M3 codes (static scales), as an engine's fused producers hand them to the op, which
    then runs no quantize kernel: the GEMV or GEMM alone."""
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    x_dtype = "BF16"
    if codes:
        x, x_dtype, per_token = x.to(torch.float8_e4m3fn).view(torch.uint8), "F8_E4M3", False
    copies = max(1, -(-4 * L2_BYTES // (N * Kd)))
    ws = [torch.randint(0, 0x7E, (N, Kd), dtype=torch.uint8, device="cuda") for _ in range(copies)]
    w_scale = torch.rand(N if per_token else 1, device="cuda") * 1e-2
    iscale = torch.tensor([0.01], device="cuda")
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    scaled = K.fp8_scaled_gemm_supported(per_token, "BF16")  # as the op decides at load
    workspace = torch.empty(K.fp8_linear_workspace_bytes(M, N, Kd, scaled), dtype=torch.uint8, device="cuda")
    turn = [0]

    def call():
        w = ws[turn[0] % copies]
        turn[0] += 1
        K.fp8_linear(y.data_ptr(), x.data_ptr(), w.data_ptr(), w_scale.data_ptr(), iscale.data_ptr(), 0, M, N, Kd,
                     x_dtype, "BF16", per_token, workspace.data_ptr(), torch.cuda.current_stream().cuda_stream,
                     path=path, scaled_gemm=scaled)  # the capture's stream
    return call


def torch_scaled_mm(M, N, Kd, rowwise, quantize=False):
    """torch._scaled_mm on pre-quantized operands, or (quantize) on bf16 x that torch quantizes first, per
    token (amax / 448) or by a static scale, as an FP8 linear written in torch does: the peer of rtllm's
    whole op."""
    b = torch.randn(N, Kd, device="cuda").to(torch.float8_e4m3fn).t()  # column-major [K, N]
    if rowwise:
        sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(1, N, device="cuda")
    else:
        sa, sb = torch.tensor(1.0, device="cuda"), torch.tensor(1.0, device="cuda")
    if not quantize:
        a = torch.randn(M, Kd, device="cuda").to(torch.float8_e4m3fn)
        return lambda: torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)

    def call():
        s = x.abs().amax(dim=1, keepdim=True).float() / 448 if rowwise else sa
        q = (x.float() / s).to(torch.float8_e4m3fn)
        return torch._scaled_mm(q, b, scale_a=s, scale_b=sb, out_dtype=torch.bfloat16)
    return call


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--only", choices=["gemv", "gemm"], help="only the GEMV (M <= 16) or the GEMM rows")
    args = parser.parse_args()
    hopper = torch.cuda.get_device_capability() == (9, 0)
    rows = []
    bw = copy_bandwidth_GBps()
    print(f"copy bandwidth (torch device-to-device, read + write): {bw:.0f} GB/s")
    for mode in ("per_token", "static", "codes") if args.only != "gemm" else ():
        for N, Kd in SHAPES:
            for M in range(1, 9):
                ms = median_ms(rtllm_call(M, N, Kd, mode == "per_token", codes=mode == "codes"))
                x_bytes = M * Kd * (1 if mode == "codes" else 2)
                gbs = (N * Kd + x_bytes + M * N * 2) / (ms * 1e-3) / 1e9
                rows.append(dict(kind="gemv", mode=mode, M=M, N=N, K=Kd, us=ms * 1e3, GBps=gbs, frac=gbs / bw))
                print(f"gemv {mode:9s} M={M} N={N:5d} K={Kd:5d}: {ms * 1e3:7.2f} us {gbs:6.0f} GB/s {gbs / bw:5.1%}")
    # where the op should switch from the GEMV to cuBLASLt (kMaxGemvRows in cuda_fp8_linear.cc)
    for N, Kd in SHAPES if args.only != "gemm" else ():
        for M in (4, 8, 12, 16):
            gemv, gemm = (median_ms(rtllm_call(M, N, Kd, True, path)) * 1e3 for path in (1, 2))
            rows.append(dict(kind="crossover", M=M, N=N, K=Kd, gemv_us=gemv, gemm_us=gemm))
            print(f"crossover per_token M={M:2d} N={N:5d} K={Kd:5d}: GEMV {gemv:7.2f} us, GEMM {gemm:7.2f} us")
    # the op's choice, then (Hopper) each of its two GEMMs, beside torch._scaled_mm on the same shape
    all_paths = [("op", 0)] + ([("cublaslt", 2), ("hopper", 3)] if hopper else [])
    for mode in ("static", "per_token", "codes") if args.only != "gemv" else ():
        per_token, codes = mode == "per_token", mode == "codes"
        paths = [("op", 0)] if codes else all_paths  # static codes: cuBLASLt applies the scales
        for N, Kd in SHAPES:
            sizes = ((64, 128, 256, 512) if per_token and hopper else ()) + (1024, 2048, 4096, 8192)
            for M in sizes:
                flop = 2.0 * M * N * Kd
                ms_t = median_ms(torch_scaled_mm(M, N, Kd, per_token), repeats=10, calls=3)
                tt = flop / (ms_t * 1e-3) / 1e12
                tq = float("nan")  # the codes rows compare the GEMM alone: no quantizing peer
                if not codes:
                    ms_q = median_ms(torch_scaled_mm(M, N, Kd, per_token, quantize=True), repeats=10, calls=3)
                    tq = flop / (ms_q * 1e-3) / 1e12
                for name, path in paths:
                    ms = median_ms(rtllm_call(M, N, Kd, per_token, path, codes), repeats=10, calls=3)
                    t = flop / (ms * 1e-3) / 1e12
                    rows.append(dict(kind="gemm", mode=mode, path=name, M=M, N=N, K=Kd, TFLOPs=t, torch_TFLOPs=tt,
                                     ratio=t / tt, torch_quantizing_TFLOPs=tq, ratio_quantizing=t / tq))
                    print(f"gemm {mode:9s} {name:8s} M={M:5d} N={N:5d} K={Kd:5d}: rtllm {t:6.0f} TFLOP/s "
                          f"torch._scaled_mm {tt:6.0f} TFLOP/s ratio {t / tt:.2f}; torch quantizing x too "
                          f"{tq:6.0f} ratio {t / tq:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_GBps=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
