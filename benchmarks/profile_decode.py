"""Where a decode step's time goes on CUDA: device time per kernel, per step, at several batch sizes.

  python benchmarks/profile_decode.py --preset llama-3-8b --batch 1 --batch 64 --batch 256 --sampling topp

For each batch size, the same requests run twice under torch's profiler (which records every kernel of
the process, rtllm's included, also when replayed from a CUDA graph): once for the prompt only
(max_tokens=1) and once with --steps more tokens. The difference, over --steps, is one decode step:
device time per kernel name, the sum of kernel time, the time the device was busy (the union of the
kernels' intervals, which overlap under programmatic dependent launch), the idle time left in each step
(launch gaps and the host's turn between steps: sampled ids to the host, scheduling, the next launch),
where the longest gaps fall, the host time of CUDA API calls, and the wall time per step. A third run, of
prompts the KV cache has not seen, gives the prefill's device time per 1,000 prompt tokens by op. The profiler
itself slows graph launches (docs/performance.md, "Design decisions and their measurements"), so wall
time and gaps read high here; bench_e2e.py gives the unprofiled step time.
"""
import argparse
import collections
import json
import os
import re
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import is_engine_dir, sampling_params  # noqa: E402
from timing import now, report  # noqa: E402

# Kernel names, as the profiler reports them, grouped into the ops of a Llama layer.
GROUPS = [("gemv", "gemv"), ("gemm (cuBLASLt)", "gemm|nvjet|sm90_xmma|cutlass|cublas"),
          ("add_rms_norm", "add_rms_norm"), ("rms_norm", "rms_norm"), ("qkv_prepare (rope + kv write)", "qkv_prepare"),
          ("attention decode", "decode_split|decode_mma"), ("attention merge", "decode_merge"),
          ("attention prefill", "prefill"), ("silu_mul", "silu_mul"),
          ("quantize activations (FP8/INT8)", "quantize|amax"), ("embedding gather", "gather"),
          ("sampling", "sample_kernel"), ("memcpy / memset", "Memcpy|Memset|memcpy|memset")]


def group_of(name):
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return name[:60]


def busy_and_gaps(intervals, long_gap_us=20.0):
    """(µs the device was busy: the union of the intervals, µs of idle gaps longer than long_gap_us, their
    count, {(name before, name after): µs} of those gaps) over [(start µs, end µs, name)]."""
    busy = long_gaps = 0.0
    num_long = 0
    where = collections.Counter()
    end, last_name = None, None
    for start, stop, name in sorted(intervals):
        if end is None or start > end:
            if end is not None and start - end > long_gap_us:
                long_gaps += start - end
                num_long += 1
                where[(group_of(last_name), group_of(name))] += start - end
            busy += stop - start
            end, last_name = stop, name
        elif stop > end:
            busy += stop - end
            end, last_name = stop, name
    return busy, long_gaps, num_long, where


def kernel_times(llm, prompts, max_tokens, sampling):
    """(seconds of wall time, {group: [device µs, launches]}, (busy µs, long-gap µs, long gaps)) of one
    generate() under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    params = sampling_params(sampling, max_tokens)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = now()
        llm.generate(prompts, params, use_tqdm=False)
        seconds = now() - start
    with tempfile.TemporaryDirectory() as tmp:  # the trace holds every device activity, graph nodes too
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = collections.defaultdict(lambda: [0.0, 0])
    host_calls = collections.defaultdict(lambda: [0.0, 0])  # CUDA API calls on the host: [µs, calls]
    intervals = []
    for event in events:
        if "dur" not in event:
            continue
        if event.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            entry = totals[group_of(event["name"])]
            entry[0] += float(event["dur"])
            entry[1] += 1
            intervals.append((float(event["ts"]), float(event["ts"]) + float(event["dur"]), event["name"]))
        elif event.get("cat") in ("cuda_runtime", "cuda_driver"):
            entry = host_calls[event["name"]]
            entry[0] += float(event["dur"])
            entry[1] += 1
    return seconds, totals, busy_and_gaps(intervals), host_calls


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF checkpoint or engine directory")
    source.add_argument("--preset", help="a named shape with random weights (rtllm.models.presets)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 1)")
    parser.add_argument("--sampling", action="append", choices=["greedy", "topp", "topk"],
                        help="sampling modes, as bench_e2e.py's (repeatable; default greedy)")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    parser.add_argument("--output", help="also write the JSON here")
    from rtllm.quantization.cli_args import add_quant_args, quant_config_of
    add_quant_args(parser)  # e.g. --quant-algo FP8 --kv-cache-quant-algo FP8 --calib-size 16: quantized in process
    args = parser.parse_args()
    batches = args.batch or [1]
    modes = args.sampling or ["greedy"]

    from rtllm import LLM, BuildConfig

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.preset:
            from rtllm.models.presets import write_random_checkpoint
            model_dir = write_random_checkpoint(os.path.join(tmp, args.preset), args.preset, dtype=args.dtype)
        # A built engine keeps its own limits (LLM refuses a build_config for it); a checkpoint is built for these.
        build_config = None if is_engine_dir(model_dir) else BuildConfig(
            max_batch_size=max(batches), max_input_len=args.isl, max_seq_len=args.isl + args.steps + 1,
            dtype=args.dtype)
        rng = np.random.default_rng(0)
        results = {"model": args.model or args.preset, "isl": args.isl, "steps": args.steps, "batches": []}
        rows = []
        quant = {"quant_config": quant_config_of(args)} if args.quant_algo or args.kv_cache_quant_algo else {}
        with LLM(model=model_dir, build_config=build_config, skip_tokenizer_init=True, device="cuda", **quant) as llm:
            import torch
            results["gpu"] = torch.cuda.get_device_name()
            for batch, mode in [(b, m) for b in batches for m in modes]:
                prompts = [rng.integers(10, 1000, size=args.isl).tolist() for _ in range(batch)]
                kernel_times(llm, prompts, args.steps + 1, mode)  # warm-up: captures this batch's graph
                prefill_s, prefill, prefill_busy, prefill_calls = kernel_times(llm, prompts, 1, mode)
                total_s, total, total_busy, total_calls = kernel_times(llm, prompts, args.steps + 1, mode)
                # The runs above reuse the warm-up's cached prompts; a prefill to look at needs prompts never seen.
                fresh = [rng.integers(10, 1000, size=args.isl).tolist() for _ in range(batch)]
                fresh_s, fresh_prefill, fresh_busy, _ = kernel_times(llm, fresh, 1, mode)
                busy_us, long_gap_us, num_long_gaps = ((t - p) / args.steps for t, p in zip(total_busy[:3], prefill_busy[:3]))
                gap_sites = {f"{a} -> {b}": (us - prefill_busy[3].get((a, b), 0.0)) / args.steps
                             for (a, b), us in total_busy[3].items()}
                host_api = {name: {"us_per_step": (us - prefill_calls[name][0]) / args.steps,
                                   "calls_per_step": (n - prefill_calls[name][1]) / args.steps}
                            for name, (us, n) in total_calls.items()}
                step = {g: ((total[g][0] - prefill[g][0]) / args.steps, (total[g][1] - prefill[g][1]) / args.steps)
                        for g in total}  # prefill is a defaultdict: groups only decode runs read as 0
                device_us = sum(us for us, _ in step.values())
                wall_us = (total_s - prefill_s) / args.steps * 1e6
                # The fresh prompts' run is the prefill of batch x isl tokens (in steps of at most max_num_tokens):
                # its device time per 1,000 prompt tokens, by op, shows where a step with prompt tokens goes.
                per_k = 1e3 / (batch * args.isl)
                prefill_per_k = {g: us * per_k for g, (us, _) in fresh_prefill.items()}
                entry = {"batch": batch, "sampling": mode, "wall_us_per_step": wall_us, "device_us_per_step": device_us,
                         "prefill_wall_us_per_1k_prompt_tokens": fresh_s * 1e6 * per_k,
                         "prefill_busy_us_per_1k_prompt_tokens": fresh_busy[0] * per_k,
                         "prefill_kernels_us_per_1k_prompt_tokens": prefill_per_k,
                         "busy_us_per_step": busy_us, "idle_us_per_step": wall_us - busy_us,
                         "gaps_over_20us_per_step": [num_long_gaps, long_gap_us], "gap_sites_us_per_step": gap_sites,
                         "host_cuda_api": host_api,
                         "kernels": {g: {"us_per_step": us, "launches_per_step": n} for g, (us, n) in step.items()}}
                results["batches"].append(entry)
                for g, (us, n) in sorted(step.items(), key=lambda kv: -kv[1][0]):
                    rows.append({"batch": batch, "sampling": mode, "op": g, "us/step": us, "launches/step": n,
                                 "share": f"{us / wall_us:.1%}"})
                rows.append({"batch": batch, "sampling": mode, "op": "all kernels", "us/step": device_us,
                             "share": f"{device_us / wall_us:.1%}"})
                rows.append({"batch": batch, "sampling": mode, "op": "device busy (union)", "us/step": busy_us,
                             "share": f"{busy_us / wall_us:.1%}"})
                rows.append({"batch": batch, "sampling": mode, "op": "idle gaps > 20 us", "us/step": long_gap_us,
                             "launches/step": num_long_gaps, "share": f"{long_gap_us / wall_us:.1%}"})
                rows.append({"batch": batch, "sampling": mode, "op": "wall time", "us/step": wall_us, "share": "100%"})
                for site, us in sorted(gap_sites.items(), key=lambda kv: -kv[1])[:3]:
                    rows.append({"batch": batch, "sampling": mode, "op": f"gap: {site}"[:60], "us/step": us,
                                 "share": f"{us / wall_us:.1%}"})
                for g, us in sorted(prefill_per_k.items(), key=lambda kv: -kv[1])[:6]:
                    rows.append({"batch": batch, "sampling": mode, "op": f"prefill per 1k tokens: {g}"[:60],
                                 "us/step": us, "share": f"{us / (fresh_busy[0] * per_k):.1%}"})
                for name, v in sorted(host_api.items(), key=lambda kv: -kv[1]["us_per_step"])[:6]:
                    rows.append({"batch": batch, "sampling": mode, "op": f"host: {name}"[:60], "us/step": v["us_per_step"],
                                 "launches/step": v["calls_per_step"], "share": f"{v['us_per_step'] / wall_us:.1%}"})
    report(results, rows, ["batch", "sampling", "op", "us/step", "launches/step", "share"], args.output)


if __name__ == "__main__":
    main()
