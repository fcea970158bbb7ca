"""Weight-only linears on CUDA (W4A16 g128 with and without offsets, g32 with offsets, W8A16 per channel): rtllm's
weight_only_linear (rtllm._core.kernels.weight_only_linear, the op's code path: the GEMV up to 64 tokens,
then up to 512 rtllm's Hopper int4 GEMM on compute capability 9.0, else dequantize + cuBLASLt) on Llama-3-8B's
shapes, beside torch.matmul in bf16 on the dequantized weight (the peer) and the device's copy bandwidth (the
roofline of a call bound by reading its weight once).
CUDA graphs of back-to-back calls, CUDA events, median of repeats (bench_fp8_gemm.median_ms); successive
calls read different copies of the weight, more bytes than the L2 holds, as a model's layers do.

    python benchmarks/bench_weight_only.py [--json OUT] [--tokens 1,2,4,8,16,64,512] [--only gemv|gemm]

GB/s counts the bytes a call must move: the packed codes, scales (and offsets) in bf16, x and y.
"""
import argparse
import json

import torch
from bench_e2e import copy_bandwidth_GBps  # the copy bandwidth as the end-to-end floor measures it
from bench_fp8_gemm import L2_BYTES, median_ms

from rtllm import _core

K = _core.kernels
SHAPES = [(4096, 4096), (6144, 4096), (28672, 4096), (4096, 14336)]  # (N, K): o_proj, fused qkv, gate_up, down
LM_HEAD = (128256, 4096)
VARIANTS = {  # name: (int4, group_size or None for per channel, has_offset)
    "w4a16_g128": (True, 128, False),
    "w4a16_g128_offset": (True, 128, True),
    "w4a16_g32_offset": (True, 32, True),  # GGUF Q4_1's blocks
    "w8a16_per_channel": (False, None, False),
}


def make_weights(N, Kd, int4, G, has_offset):
    """Enough copies of one random weight (codes, bf16 scales and offsets) to stream each call from HBM."""
    code_bytes = N * Kd // 2 if int4 else N * Kd
    copies = max(1, -(-4 * L2_BYTES // code_bytes))
    out = []
    for _ in range(copies):
        codes = torch.randint(0, 256, (N, code_bytes // N), dtype=torch.uint8, device="cuda")
        scale = (torch.rand(N, Kd // G, device="cuda") * 1e-2 + 1e-3).to(torch.bfloat16)
        offset = (torch.randn(N, Kd // G, device="cuda") * 1e-3).to(torch.bfloat16) if has_offset else None
        out.append((codes, scale, offset))
    moved = code_bytes + 2 * N * (Kd // G) * (2 if has_offset else 1)
    return out, moved


def rtllm_call(M, N, Kd, int4, G, has_offset, path=0, k_splits=0):
    weights, moved = make_weights(N, Kd, int4, G, has_offset)
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
    workspace = torch.empty(K.weight_only_linear_workspace_bytes(N, Kd, M), dtype=torch.uint8, device="cuda")
    turn = [0]

    def call():
        codes, scale, offset = weights[turn[0] % len(weights)]
        turn[0] += 1
        K.weight_only_linear(y.data_ptr(), x.data_ptr(), codes.data_ptr(), scale.data_ptr(),
                             0 if offset is None else offset.data_ptr(), 0, M, N, Kd, G, int4, "BF16", "BF16",
                             workspace.data_ptr(), torch.cuda.current_stream().cuda_stream, path=path,
                             gemv_k_splits=k_splits)
    return call, moved + 2 * M * (Kd + N)


def torch_matmul(M, N, Kd):
    """The peer: x · Wᵀ in bf16 on an already dequantized weight (cuBLAS), copies past the L2 as above."""
    copies = max(1, -(-4 * L2_BYTES // (2 * N * Kd)))
    ws = [torch.randn(N, Kd, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(M, Kd, device="cuda", dtype=torch.bfloat16)
    turn = [0]

    def call():
        w = ws[turn[0] % copies]
        turn[0] += 1
        return torch.matmul(x, w.t())
    return call


def gemm_rows(rows):
    """Prefill and large decode batches, W4A16 g128 with zero points: the op's dequantize + cuBLASLt (path 2)
    and, on compute capability 9.0, rtllm's Hopper int4 GEMM (path 3), beside torch bf16 on a dequantized
    weight (TFLOP/s)."""
    paths = [("dequant_gemm", 2)] + ([("hopper_gemm", 3)] if torch.cuda.get_device_capability() == (9, 0) else [])
    for N, Kd in SHAPES:
        for M in (128, 256, 512, 1024, 4096):
            flop = 2.0 * M * N * Kd
            peer_ms = median_ms(torch_matmul(M, N, Kd), calls=3)
            row = dict(kind="gemm", variant="w4a16_g128_offset", M=M, N=N, K=Kd, torch_bf16_TFLOPs=flop / peer_ms / 1e9)
            for name, path in paths:
                ms = median_ms(rtllm_call(M, N, Kd, True, 128, True, path)[0], calls=3)
                row[name + "_TFLOPs"] = flop / ms / 1e9
            rows.append(row)
            print(f"gemm w4a16_g128_offset M={M:4d} N={N:5d} K={Kd:5d}: " +
                  ", ".join(f"{k[:-7]} {v:6.0f} TFLOP/s" for k, v in row.items() if k.endswith("_TFLOPs")))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--tokens", default="1,2,4,8,16,64,512")
    parser.add_argument("--only", choices=["gemv", "gemm"],
                        help="gemv: all but the large-batch rows; gemm: only those (dequantize + cuBLASLt, the "
                        "Hopper GEMM, torch bf16)")
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    bw = copy_bandwidth_GBps()
    print(f"copy bandwidth (torch device-to-device, read + write): {bw:.0f} GB/s")
    rows = []
    peer = {}
    if args.only == "gemm":
        gemm_rows(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(copy_GBps=bw, rows=rows), f, indent=1)
        return
    for N, Kd in SHAPES:
        for M in tokens:
            calls = 20 if M <= 64 else 3
            ms = median_ms(torch_matmul(M, N, Kd), calls=calls)
            peer[(M, N, Kd)] = ms
            gbs = 2 * (N * Kd + M * Kd + M * N) / (ms * 1e-3) / 1e9
            rows.append(dict(kind="torch_bf16", M=M, N=N, K=Kd, us=ms * 1e3, GBps=gbs, frac=gbs / bw))
            print(f"torch bf16        M={M:4d} N={N:5d} K={Kd:5d}: {ms * 1e3:8.2f} us {gbs:6.0f} GB/s {gbs / bw:5.1%}")
    for name, (int4, group, has_offset) in VARIANTS.items():
        for N, Kd in SHAPES:
            G = group or Kd
            for M in tokens:
                calls = 20 if M <= 64 else 3
                call, moved = rtllm_call(M, N, Kd, int4, G, has_offset)
                ms = median_ms(call, calls=calls)
                gbs = moved / (ms * 1e-3) / 1e9
                speedup = peer[(M, N, Kd)] / ms
                rows.append(dict(kind="rtllm", variant=name, M=M, N=N, K=Kd, us=ms * 1e3, GBps=gbs, frac=gbs / bw,
                                 torch_bf16_us=peer[(M, N, Kd)] * 1e3, speedup_vs_torch=speedup))
                print(f"{name:18s} M={M:4d} N={N:5d} K={Kd:5d}: {ms * 1e3:8.2f} us {gbs:6.0f} GB/s {gbs / bw:5.1%} "
                      f"x{speedup:.2f} vs torch bf16")
    # the GEMV's split of K between warps (weight_only_gemv_k_splits picks one from N and K)
    for N, Kd in SHAPES + [LM_HEAD]:
        own = K.weight_only_gemv_k_splits(N, Kd)
        for M in (1, 4, 8, 16):
            times = {ks: median_ms(rtllm_call(M, N, Kd, True, 128, False, 1, ks)[0], calls=20) * 1e3
                     for ks in (1, 2, 4, 8)}
            moved = N * Kd // 2 + 2 * N * (Kd // 128) + 2 * M * (Kd + N)
            rows.append(dict(kind="k_splits", variant="w4a16_g128", M=M, N=N, K=Kd, own=own,
                             us={str(ks): us for ks, us in times.items()}))
            print(f"k_splits w4a16_g128 M={M:2d} N={N:6d} K={Kd:5d} (own {own}): " + ", ".join(
                f"{ks}: {us:7.2f} us {moved / (us * 1e-6) / 1e9 / bw:5.1%}" for ks, us in times.items()))
    # where the op should switch from the GEMV to the dequantized GEMM (kMaxGemvRows in
    # cuda_weight_only_linear.cc)
    for N, Kd in SHAPES:
        for M in (16, 32, 48, 64, 96, 128):
            gemv, gemm = (median_ms(rtllm_call(M, N, Kd, True, 128, False, path)[0]) * 1e3 for path in (1, 2))
            rows.append(dict(kind="crossover", variant="w4a16_g128", M=M, N=N, K=Kd, gemv_us=gemv, gemm_us=gemm))
            print(f"crossover w4a16_g128 M={M:2d} N={N:5d} K={Kd:5d}: GEMV {gemv:8.2f} us, GEMM {gemm:8.2f} us")
    if args.only != "gemv":
        gemm_rows(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_GBps=bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
