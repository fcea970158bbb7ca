"""rtllm's CUDA kernels against their rooflines and torch, measured in the same run.

The two ceilings come first: device copy bandwidth (a large device-to-device copy, bytes read +
written) and the bf16 torch.matmul rate. Each kernel row gives its time, its bytes moved once
(each input read once, each output written once), the bandwidth that implies and its fraction of the
copy bandwidth, and where torch has the same op, torch's time.

Timing: each measurement captures `calls` launches in a CUDA graph, rotating over input sets whose
total size exceeds twice the L2 cache (so bandwidth rows do not measure the cache), and takes the
median over `reps` graph replays timed with CUDA events.

Other kernel families add rows by appending a function `bench(ctx) -> list[dict]` to BENCHES (see
`register`). Usage: python benchmarks/bench_kernels.py [--output results.json] [--only gemv,norm]
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import report  # noqa: E402

BENCHES = []


def register(fn):
    """Adds a bench function (ctx -> list of row dicts) to the suite; usable as a decorator."""
    BENCHES.append(fn)
    return fn


def load_kernels():
    try:
        from rtllm import _core
    except ImportError:
        import _core  # a development build on PYTHONPATH
    if not hasattr(_core, "kernels"):
        raise SystemExit("rtllm was built without the CUDA backend")
    return _core.kernels


class Context:
    """What every bench function gets: the kernels module, the ceilings and the timing helpers."""

    def __init__(self, kernels, reps=30, calls=20):
        self.kernels = kernels
        self.reps, self.calls = reps, calls
        self.props = torch.cuda.get_device_properties(0)
        self.l2_bytes = getattr(self.props, "L2_cache_size", 50 << 20)
        self.copy_gbps = None
        self.matmul_tflops = None

    @property
    def stream(self):
        return torch.cuda.current_stream().cuda_stream

    def num_sets(self, bytes_per_set, max_sets=16):
        """How many input sets to rotate over so that together they exceed twice the L2."""
        return int(min(max_sets, max(1, -(-2 * self.l2_bytes // max(bytes_per_set, 1)) + 1)))

    def time_ms(self, launch, num_sets=1):
        """Median milliseconds of one launch(i) call, i cycling over range(num_sets)."""
        for i in range(num_sets):  # warm up (module load, first-touch)
            launch(i)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            launch(0)  # one eager launch on the capture stream
            with torch.cuda.graph(graph, stream=side):
                for c in range(self.calls):
                    launch(c % num_sets)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / self.calls)
        return float(np.median(times))

    def row(self, kernel, shape, ms, bytes_moved, torch_ms=None, **extra):
        gbps = bytes_moved / (ms * 1e-3) / 1e9
        r = {"kernel": kernel, "shape": shape, "us": ms * 1e3, "GB/s": gbps,
             "of_copy": gbps / self.copy_gbps if self.copy_gbps else None}
        if torch_ms is not None:
            r["torch_us"] = torch_ms * 1e3
            r["vs_torch"] = torch_ms / ms
        r.update(extra)
        return r


def rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float32) * scale).to(dtype)


@register
def bench_ceilings(ctx):
    """Device copy bandwidth and the bf16 matmul rate: the rooflines of every other row."""
    n = 1 << 29  # 1 GiB per bf16 buffer
    src, dst = rand(n), torch.empty(n, dtype=torch.bfloat16, device="cuda")
    # The copy engine (cudaMemcpyAsync) and an SM kernel (an elementwise multiply by 1) can differ;
    # the faster one is the ceiling.
    ms_memcpy = ctx.time_ms(lambda i: dst.copy_(src))
    ms_kernel = ctx.time_ms(lambda i: torch.mul(src, 1.0, out=dst))
    ms = min(ms_memcpy, ms_kernel)
    ctx.copy_gbps = 4 * n / (ms * 1e-3) / 1e9
    del src, dst
    a, b = rand(8192, 8192), rand(8192, 8192)
    mm_ms = ctx.time_ms(lambda i: torch.matmul(a, b))
    ctx.matmul_tflops = 2 * 8192 ** 3 / (mm_ms * 1e-3) / 1e12
    return [{"kernel": "copy (memcpy D2D)", "shape": "1 GiB", "us": ms_memcpy * 1e3, "GB/s": 4 * n / ms_memcpy / 1e6},
            {"kernel": "copy (SM kernel)", "shape": "1 GiB", "us": ms_kernel * 1e3, "GB/s": 4 * n / ms_kernel / 1e6},
            {"kernel": "torch.matmul bf16", "shape": "8192^3", "us": mm_ms * 1e3, "TFLOP/s": ctx.matmul_tflops}]


GEMV_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]  # (n, k): y = x · Wᵀ
GEMV_MS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # up to kGemvMaxM: where the GEMV stops beating torch.matmul


@register
def bench_gemv(ctx):
    k_mod, rows = ctx.kernels, []
    for n, k in GEMV_SHAPES:
        w_bytes = n * k * 2
        sets = ctx.num_sets(w_bytes, max_sets=8)
        weights = [rand(n, k, scale=0.02) for _ in range(sets)]
        for m in GEMV_MS:
            if not k_mod.gemv_supported(m, k):  # an older build's limit (same-machine A/B)
                continue
            x = [rand(m, k) for _ in range(sets)]
            y = [torch.empty(m, n, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
            ms = ctx.time_ms(lambda i: k_mod.gemv(y[i].data_ptr(), x[i].data_ptr(), weights[i].data_ptr(), 0, m, n,
                                                  k, k_mod.BF16, ctx.stream), sets)
            torch_ms = ctx.time_ms(lambda i: torch.matmul(x[i], weights[i].T, out=y[i]), sets)
            bytes_moved = w_bytes + 2 * m * k + 2 * m * n
            rows.append(ctx.row("gemv", f"m={m} n={n} k={k}", ms, bytes_moved, torch_ms))
            # The linear op: the GEMV or cuBLASLt, as it chose for the shape (timed on its first call here).
            if hasattr(k_mod, "linear"):
                ms = ctx.time_ms(lambda i: k_mod.linear(y[i].data_ptr(), x[i].data_ptr(), weights[i].data_ptr(), 0,
                                                        m, n, k, "BF16", "BF16", ctx.stream), sets)
                rows.append(ctx.row("linear (op)", f"m={m} n={n} k={k}", ms, bytes_moved, torch_ms))
        del weights
    return rows


@register
def bench_norm_and_activation(ctx):
    k_mod, rows = ctx.kernels, []
    for tokens, hidden in [(1, 4096), (256, 4096), (4096, 4096), (4096, 8192)]:
        elems = tokens * hidden
        sets = ctx.num_sets(4 * elems * 2)
        x = [rand(tokens, hidden) for _ in range(sets)]
        res = [rand(tokens, hidden) for _ in range(sets)]
        out = [torch.empty_like(x[0]) for _ in range(sets)]
        w = rand(hidden)
        ms = ctx.time_ms(lambda i: k_mod.rms_norm(out[i].data_ptr(), x[i].data_ptr(), w.data_ptr(), tokens, hidden,
                                                  hidden, 1e-6, k_mod.BF16, ctx.stream), sets)
        torch_ms = ctx.time_ms(lambda i: torch.nn.functional.rms_norm(x[i], (hidden,), w, 1e-6), sets)
        rows.append(ctx.row("rms_norm", f"{tokens}x{hidden}", ms, 2 * elems * 2, torch_ms))
        ms = ctx.time_ms(lambda i: k_mod.add_rms_norm(out[i].data_ptr(), res[i].data_ptr(), x[i].data_ptr(),
                                                      res[i].data_ptr(), w.data_ptr(), tokens, hidden, 1e-6,
                                                      k_mod.BF16, ctx.stream), sets)
        rows.append(ctx.row("add_rms_norm", f"{tokens}x{hidden}", ms, 4 * elems * 2))
    for tokens, inter in [(1, 14336), (256, 14336), (4096, 14336)]:
        sets = ctx.num_sets(3 * tokens * inter * 2)
        x = [rand(tokens, 2 * inter) for _ in range(sets)]
        out = [torch.empty(tokens, inter, dtype=torch.bfloat16, device="cuda") for _ in range(sets)]
        ms = ctx.time_ms(lambda i: k_mod.silu_mul(out[i].data_ptr(), x[i].data_ptr(), tokens, inter, k_mod.BF16,
                                                  ctx.stream), sets)
        torch_ms = ctx.time_ms(
            lambda i: torch.mul(torch.nn.functional.silu(x[i][:, :inter]), x[i][:, inter:], out=out[i]), sets)
        rows.append(ctx.row("silu_mul", f"{tokens}x{inter}", ms, 3 * tokens * inter * 2, torch_ms))
    return rows


def params_array(kernels, rows):
    """Packs dicts of SamplingParamsDevice fields into device memory with the C++ layout."""
    off = kernels.SAMPLING_PARAMS_OFFSETS
    fields = {"temperature": np.float32, "top_p": np.float32, "min_p": np.float32, "repetition_penalty": np.float32,
              "presence_penalty": np.float32, "frequency_penalty": np.float32, "top_k": np.int32,
              "num_logprobs": np.int32, "seed": np.uint64, "step": np.int64}
    dt = np.dtype({"names": list(fields), "formats": list(fields.values()), "offsets": [off[n] for n in fields],
                   "itemsize": kernels.SAMPLING_PARAMS_SIZE})
    arr = np.zeros(len(rows), dtype=dt)
    defaults = dict(temperature=1.0, top_p=1.0, repetition_penalty=1.0, num_logprobs=-1)
    for i, r in enumerate(rows):
        for k, v in {**defaults, **r}.items():
            arr[i][k] = v
    return torch.from_numpy(arr.view(np.uint8).copy()).cuda()


RANDOM_MODEL_LOGIT_STD = 0.02 * 4096 ** 0.5  # the logits' spread of a random Llama-3-8B-shaped model


@register
def bench_sampling(ctx):
    """Device sampling of a whole batch (a cluster of CTAs per row for small batches, one CTA per row for
    large ones); bytes = the float32 logits read once. Flat rows (randn · 0.05: the top-p set holds most of
    the vocabulary), the same rounded to bfloat16 (a bf16 LM head's output: long runs of tied logits),
    rows at the spread of bench_e2e's random Llama-3-8B-shaped model (randn · 1.28: weights of std 0.02 over
    4,096 normalized inputs; its top-p steps took twice the flat rows' time in profile_decode.py) and
    peaked ones (randn · 4). Each case draws its rows from its own fixed seed, so that two builds measured in
    two processes (an A/B) sample the same rows: the window select's hits and misses depend on them."""
    k_mod, rows = ctx.kernels, []
    modes = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95), dict(temperature=0.8, top_k=50),
             dict(temperature=0.8)]
    cases = [(num_seqs, 128256, scale, mode) for num_seqs in (1, 64, 256, 512)
             for scale in (0.05, "bf16", RANDOM_MODEL_LOGIT_STD, 4.0)
             for mode in modes if scale != "bf16" or mode.get("temperature")]
    cases.append((64, 152064, 3.0, dict(temperature=1.0, top_p=0.95, num_logprobs=5)))
    for case, (num_seqs, vocab, scale, settings) in enumerate(cases):
        torch.manual_seed(case)
        if scale == "bf16":
            logits = rand(num_seqs, vocab, dtype=torch.bfloat16, scale=0.05).float()
        else:
            logits = rand(num_seqs, vocab, dtype=torch.float32, scale=scale)
        params = params_array(k_mod, [dict(settings, seed=i) for i in range(num_seqs)])
        ids = torch.empty(num_seqs, dtype=torch.int32, device="cuda")
        lp = torch.empty(num_seqs, 9, device="cuda")
        top = torch.empty(num_seqs, 8, dtype=torch.int32, device="cuda")
        ms = ctx.time_ms(lambda i: k_mod.sample(ids.data_ptr(), lp.data_ptr(), top.data_ptr(), logits.data_ptr(),
                                                params.data_ptr(), num_seqs=num_seqs, vocab_size=vocab, max_top=8,
                                                stream=ctx.stream))
        name = ",".join(f"{k}={v}" for k, v in settings.items())
        kind = ("bf16-flat" if scale == "bf16" else "random-model" if scale == RANDOM_MODEL_LOGIT_STD
                else "flat" if scale < 1 else "peaked")
        rows.append(ctx.row("sample", f"{num_seqs}x{vocab} {kind} {name}", ms, num_seqs * vocab * 4))
    return rows


from bench_attention import bench_attention  # noqa: E402  decode GB/s and prefill TFLOP/s vs torch SDPA
register(bench_attention)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="write the JSON results here")
    parser.add_argument("--only", help="comma-separated substrings of bench function names to run")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    ctx = Context(load_kernels(), reps=args.reps)
    rows = []
    for fn in BENCHES:
        if fn is not bench_ceilings and args.only and not any(s in fn.__name__ for s in args.only.split(",")):
            continue
        rows += fn(ctx)
        torch.cuda.empty_cache()
    results = {"device": ctx.props.name, "copy_GBps": ctx.copy_gbps, "matmul_bf16_TFLOPs": ctx.matmul_tflops,
               "rows": rows}
    report(results, rows, ["kernel", "shape", "us", "GB/s", "of_copy", "torch_us", "vs_torch", "TFLOP/s", "of_matmul"],
           args.output)


if __name__ == "__main__":
    main()
