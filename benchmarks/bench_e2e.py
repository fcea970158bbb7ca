"""End-to-end generation benchmark: rtllm next to HF transformers on the same prompts, same run.

  python benchmarks/bench_e2e.py --preset llama-30m --num-requests 32 --isl 128 --osl 64
  python benchmarks/bench_e2e.py --preset llama-3-8b --dtype bfloat16 --device cuda \
      --workload 128x128x1000 --workload 2048x2048x200 --max-batch-size 256 --hf-requests 64

Each workload (input tokens x output tokens x requests, greedy unless suffixed ":topp" for temperature
0.8 / top-p 0.95 or ":topk" for temperature 0.8 / top-k 50) runs on one loaded model, in the order given
(so a workload listed twice shows the cold and the warm process): offline throughput (output tokens/s
over all requests submitted at once), time to first token (TTFT), time per output token after the
first (TPOT) and inter-token latency (ITL). Then batch-1 decode latency, greedy and top-p, next to its
floor on CUDA (weight bytes over the device-to-device copy bandwidth measured in this run); then a
slice of each workload (--hf-requests, outputs capped by --hf-max-osl) through HF transformers.
--model takes an HF checkpoint or a built engine directory (then the engine's limits apply and HF is
skipped); the same engine run under two builds of rtllm is a same-machine A/B.
"""
import argparse
import asyncio
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import now, report, summarize  # noqa: E402


def random_prompts(num_requests, isl, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab_size, size=isl).tolist() for _ in range(num_requests)]


def step_breakdown(steps, seconds):
    """Where a workload's time went, from the executor's per-step stats: decode-only steps, steps with
    prompt tokens (prefill or mixed), and the wall time outside any step (host work between steps). Each
    kind's host_ms_per_step is the loop thread's own work per step (scheduling and inputs before the worker
    runs the step, postprocessing after it), which the device waits through: what overlapping the host with
    the device would hide; execute_ms_per_step is the worker's (the forward and the draw)."""
    out = {"num_steps": len(steps), "wall_s": seconds}
    for kind, chosen in (("decode_only", [s for s in steps if s["num_context_tokens"] == 0]),
                         ("with_prompt_tokens", [s for s in steps if s["num_context_tokens"] > 0])):
        def mean(value):
            return float(np.mean([value(s) for s in chosen])) if chosen else 0.0

        out[kind] = {"steps": len(chosen), "seconds": sum(s["step_time_ms"] for s in chosen) / 1e3,
                     "host_ms_per_step": mean(lambda s: s["schedule_time_ms"] + s["postprocess_time_ms"]),
                     "schedule_ms_per_step": mean(lambda s: s["schedule_time_ms"]),
                     "execute_ms_per_step": mean(lambda s: s["execute_time_ms"]),
                     "postprocess_ms_per_step": mean(lambda s: s["postprocess_time_ms"]),
                     "mean_generation_tokens": mean(lambda s: s["num_generation_tokens"]),
                     "mean_context_tokens": mean(lambda s: s["num_context_tokens"])}
    out["outside_steps_s"] = seconds - sum(s["step_time_ms"] for s in steps) / 1e3
    return out


async def _collect_steps(llm, steps, stop):
    """Drains the executor's bounded per-step stats queue while a workload runs."""
    while not stop.is_set():
        steps += llm.get_iteration_stats()
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except asyncio.TimeoutError:
            pass
    steps += llm.get_iteration_stats()


async def _stream_all(llm, prompts, params):
    """Submits every prompt at once and records each token's arrival time and the executor's steps."""
    llm.get_iteration_stats()  # drop the steps of earlier work
    steps, stop = [], asyncio.Event()
    collector = asyncio.create_task(_collect_steps(llm, steps, stop))
    start = now()

    async def one(prompt):
        arrivals = []
        async for out in llm.generate_async(prompt, params, streaming=True):
            arrivals += [now()] * len(out.outputs[0].token_ids_diff)
        return arrivals

    arrivals = await asyncio.gather(*(one(p) for p in prompts))
    end = now()
    stop.set()
    await collector
    _stream_all.last_steps = step_breakdown(steps, end - start)
    return start, end, arrivals


SAMPLING = {"greedy": dict(temperature=0.0), "topp": dict(temperature=0.8, top_p=0.95, seed=0),
            "topk": dict(temperature=0.8, top_k=50, seed=0)}


def sampling_params(mode, max_tokens):
    from rtllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **SAMPLING[mode])


def is_engine_dir(path):
    """Whether `path` is a built engine, as LLM decides it (rtllm.llmapi.llm.is_engine_dir)."""
    from rtllm.llmapi.llm import is_engine_dir as rtllm_is_engine_dir

    return rtllm_is_engine_dir(path)


def fresh_prompt(high, length, seed):
    """A prompt of `length` random ids in [10, high), from its own seed: no workload holds it, so no prefix of
    it is in the KV cache's reusable blocks and its whole prefill runs."""
    return np.random.default_rng([7919, seed]).integers(10, high, size=length).tolist()


def ttft_by_prompt_len(llm, high, n):
    """Batch-1 TTFT (ms, greedy, one token) at a prompt length the process has prefilled alone already (n)
    and at lengths it has not, each twice, every prompt fresh (no cached prefix): a first prefill of a new
    token count may pay for work done once per shape (GEMM plans, kernels loaded on first use), which a
    server with prompts of every length meets all the time."""
    lengths = [n] + [m for m in (n - 1, n - 27, n // 2 + 3) if 0 < m < n]
    out = []
    for m in lengths:
        for attempt in ("first", "again"):
            prompt = fresh_prompt(high, m, seed=1000 + len(out))
            start, _, arrivals = asyncio.run(_stream_all(llm, [prompt], sampling_params("greedy", 1)))
            out.append({"prompt_len": m, "run": attempt, "ttft_ms": (arrivals[0][0] - start) * 1e3})
    print("rtllm batch 1 TTFT by prompt length (first run, again), ms: " +
          ", ".join(f"{out[i]['prompt_len']}: {out[i]['ttft_ms']:.2f} / {out[i + 1]['ttft_ms']:.2f}"
                    for i in range(0, len(out), 2)), flush=True)
    return out


def bench_rtllm(model_dir, workloads, args):
    from rtllm import LLM, BuildConfig

    max_isl = max(len(w["prompts"][0]) for w in workloads)
    max_seq = max(len(w["prompts"][0]) + w["osl"] for w in workloads)
    engine = is_engine_dir(model_dir)
    build_config = None if engine else BuildConfig(
        max_batch_size=args.max_batch_size or 64, max_input_len=max_isl, max_seq_len=max_seq,
        max_num_tokens=args.max_num_tokens or 8192, dtype=args.dtype)
    # An engine runs at its own limits unless --max-batch-size / --max-num-tokens lower them for this run.
    limits = {name: value for name, value in (("max_batch_size", args.max_batch_size),
                                              ("max_num_tokens", args.max_num_tokens)) if engine and value}
    results = {"workloads": []}
    quant = {}
    if getattr(args, "quant_algo", None) or getattr(args, "kv_cache_quant_algo", None):
        from rtllm.quantization.cli_args import quant_config_of
        quant = {"quant_config": quant_config_of(args)}
    with LLM(model=model_dir, build_config=build_config, skip_tokenizer_init=True, device=args.device,
             **limits, **quant) as llm:
        first = workloads[0]["prompts"]
        llm.generate(first[:2], sampling_params("greedy", 4), use_tqdm=False)  # warm-up
        for w in workloads:
            params = sampling_params(w["sampling"], w["osl"])
            start, end, arrivals = asyncio.run(_stream_all(llm, w["prompts"], params))
            num_out = sum(len(a) for a in arrivals)
            results["workloads"].append({
                "isl": len(w["prompts"][0]), "osl": w["osl"], "sampling": w["sampling"],
                "num_requests": len(w["prompts"]), "output_tokens": num_out, "seconds": end - start,
                "output_tokens_per_s": num_out / (end - start),
                "ttft": summarize([a[0] - start for a in arrivals]),
                "tpot": summarize([(a[-1] - a[0]) / (len(a) - 1) for a in arrivals if len(a) > 1]),
                "itl": summarize(np.concatenate([np.diff(a) for a in arrivals])),
                "steps": _stream_all.last_steps,
            })
            b = _stream_all.last_steps
            print(f"rtllm {results['workloads'][-1]['isl']}/{w['osl']} x{len(w['prompts'])} {w['sampling']}: "
                  f"{results['workloads'][-1]['output_tokens_per_s']:,.0f} output tok/s; {b['num_steps']} steps: "
                  f"{b['decode_only']['steps']} decode-only in {b['decode_only']['seconds']:.2f} s (mean batch "
                  f"{b['decode_only']['mean_generation_tokens']:.0f}; host {b['decode_only']['host_ms_per_step']:.3f} "
                  f"ms per step), {b['with_prompt_tokens']['steps']} with prompt tokens in "
                  f"{b['with_prompt_tokens']['seconds']:.2f} s (mean {b['with_prompt_tokens']['mean_context_tokens']:.0f} "
                  f"prompt tokens; host {b['with_prompt_tokens']['host_ms_per_step']:.3f} ms per step), "
                  f"{b['outside_steps_s']:.2f} s outside steps",
                  flush=True)
        osl = workloads[0]["osl"]
        # Fresh prompts (no cached prefix: the TTFT is a whole prefill), one per mode, over the workloads' ids.
        high = max(max(p) for p in first) + 1
        for seed, (mode, key) in enumerate((("greedy", "batch1"), ("topp", "batch1_topp"))):
            prompt = fresh_prompt(high, len(first[0]), seed)
            start, end, arrivals = asyncio.run(_stream_all(llm, [prompt], sampling_params(mode, osl)))
            a = arrivals[0]
            results[key] = {"ttft_ms": (a[0] - start) * 1e3, "tpot_ms": (a[-1] - a[0]) / (len(a) - 1) * 1e3,
                            "output_tokens_per_s": (len(a) - 1) / (a[-1] - a[0]),
                            "host_ms_per_step": _stream_all.last_steps["decode_only"]["host_ms_per_step"]}
            print(f"rtllm batch 1 {mode}: TTFT {results[key]['ttft_ms']:.2f} ms ({len(first[0])}-token prompt), "
                  f"TPOT {results[key]['tpot_ms']:.3f} ms (host {results[key]['host_ms_per_step']:.3f} ms per step)",
                  flush=True)
        results["batch1_ttft_by_prompt_len"] = ttft_by_prompt_len(llm, high, len(first[0]))
    return results


def copy_bandwidth_GBps():
    """Bytes read + written per second by a 2 GiB device-to-device copy, median of 20 (GB/s)."""
    import torch

    src = torch.randn(2**29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    times = []
    for _ in range(21):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e-3)
    seconds = float(np.median(times[1:]))
    bandwidth = 2 * src.numel() * src.element_size() / seconds
    del src, dst
    torch.cuda.empty_cache()
    return bandwidth / 1e9


def decode_floor(model_dir):
    """Batch-1 decode floor on CUDA: every weight byte read once per token at the copy bandwidth
    measured now (copy_bandwidth_GBps)."""
    weight_bytes = sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
                       if f.endswith((".safetensors", ".engine")))
    bandwidth = copy_bandwidth_GBps()
    return {"weight_bytes": weight_bytes, "copy_bandwidth_GBps": bandwidth,
            "floor_ms": weight_bytes / (bandwidth * 1e9) * 1e3}


def bench_hf(model_dir, workloads, args):
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if args.device == "cuda" else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
             "auto": "auto"}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def generate(batch, num_tokens):
        ids = torch.tensor(batch, device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                           min_new_tokens=num_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    generate(workloads[0]["prompts"][:1], 4)  # warm-up
    results = {"workloads": []}
    for w in workloads:
        batch = w["prompts"][:args.hf_requests]
        osl = min(w["osl"], args.hf_max_osl or w["osl"])
        start = now()
        generate(batch, osl)
        seconds = now() - start
        results["workloads"].append({"isl": len(batch[0]), "osl": osl, "num_requests": len(batch),
                                     "output_tokens": len(batch) * osl, "seconds": seconds,
                                     "output_tokens_per_s": len(batch) * osl / seconds})
    osl = workloads[0]["osl"]
    start = now()
    generate(workloads[0]["prompts"][:1], osl)
    seconds = now() - start
    results["batch1"] = {"tpot_ms": seconds / osl * 1e3, "output_tokens_per_s": osl / seconds}
    return results


def parse_workload(text):
    sizes, _, mode = text.lower().partition(":")
    mode = mode or "greedy"
    try:
        isl, osl, num = (int(v) for v in sizes.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"workload {text!r} must be ISLxOSLxREQUESTS[:topp|:topk], "
                                         "e.g. 128x128x1000:topp")
    if min(isl, osl, num) < 1:
        raise argparse.ArgumentTypeError(f"workload {text!r}: every number must be >= 1")
    if mode not in SAMPLING:
        raise argparse.ArgumentTypeError(f"workload {text!r}: sampling {mode!r} is not one of {', '.join(SAMPLING)}")
    return isl, osl, num, mode


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF checkpoint or engine directory")
    source.add_argument("--preset", help="a named shape with random weights (rtllm.models.presets)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--isl", type=int, default=128, help="input tokens per request")
    parser.add_argument("--osl", type=int, default=64, help="output tokens per request")
    parser.add_argument("--workload", type=parse_workload, action="append",
                        help="ISLxOSLxREQUESTS; repeatable; replaces --isl/--osl/--num-requests")
    parser.add_argument("--hf-requests", type=int, default=None, help="requests for HF (default: all)")
    parser.add_argument("--hf-max-osl", type=int, default=None, help="cap on HF's output tokens")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="the build's batch limit (default 64); with an engine, a lower limit for this run")
    parser.add_argument("--max-num-tokens", type=int, default=None,
                        help="tokens per step of the build (default 8192); with an engine, a lower limit for this run")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")
    try:
        from rtllm.quantization.cli_args import add_quant_args
        add_quant_args(parser)
    except ImportError:  # an older rtllm (a same-machine A/B runs this script under the previous build)
        pass
    args = parser.parse_args()
    specs = args.workload or [(args.isl, args.osl, args.num_requests, "greedy")]
    args.hf_requests = args.hf_requests or max(spec[2] for spec in specs)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.preset:
            from rtllm.models.presets import write_random_checkpoint
            dtype = "float32" if args.dtype == "auto" else args.dtype
            model_dir = write_random_checkpoint(os.path.join(tmp, args.preset), args.preset, dtype=dtype)
        import json
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        vocab_size = config.get("model_config", config)["vocab_size"]  # an engine's or a checkpoint's
        args.skip_hf = args.skip_hf or is_engine_dir(model_dir)
        workloads = [{"prompts": random_prompts(num, isl, vocab_size, seed=i), "osl": osl, "sampling": mode}
                     for i, (isl, osl, num, mode) in enumerate(specs)]
        results = {"model": args.model or args.preset, "dtype": args.dtype, "device": args.device,
                   "cpu_count": os.cpu_count()}
        if args.device == "cuda":
            import torch
            results["gpu"] = torch.cuda.get_device_name()
            results["floor"] = decode_floor(model_dir)
        results["rtllm"] = bench_rtllm(model_dir, workloads, args)
        if not args.skip_hf:
            results["hf_transformers"] = bench_hf(model_dir, workloads, args)

    rows = []
    for engine in ("rtllm", "hf_transformers"):
        if engine not in results:
            continue
        r = results[engine]
        for w in r["workloads"]:
            rows.append({"engine": engine, "isl/osl": f"{w['isl']}/{w['osl']} {w.get('sampling', 'greedy')}",
                         "requests": w["num_requests"],
                         "output tok/s": w["output_tokens_per_s"],
                         "TTFT p50 ms": w.get("ttft", {}).get("p50_ms"),
                         "TPOT p50 ms": w.get("tpot", {}).get("p50_ms")})
        for key in ("batch1", "batch1_topp"):
            if key in r:
                rows.append({"engine": engine, "isl/osl": key.replace("batch1", "batch 1").replace("_", " "),
                             "requests": 1, "output tok/s": r[key]["output_tokens_per_s"],
                             "TPOT p50 ms": r[key]["tpot_ms"]})
    if "floor" in results:
        floor = results["floor"]
        rows.append({"engine": "floor", "isl/osl": "batch 1", "TPOT p50 ms": floor["floor_ms"]})
        results["batch1_over_floor"] = results["rtllm"]["batch1"]["tpot_ms"] / floor["floor_ms"]
    report(results, rows, ["engine", "isl/osl", "requests", "output tok/s", "TTFT p50 ms", "TPOT p50 ms"],
           args.output)
    if "batch1_over_floor" in results:
        print(f"batch-1 TPOT / floor: {results['batch1_over_floor']:.3f} "
              f"(copy {results['floor']['copy_bandwidth_GBps']:,.0f} GB/s)")

if __name__ == "__main__":
    main()
