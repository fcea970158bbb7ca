"""End-to-end generation benchmark: rtllm next to HF transformers on the same prompts, same run.

  python benchmarks/bench_e2e.py --preset llama-30m --num-requests 32 --isl 128 --osl 64
  python benchmarks/bench_e2e.py --model ./hf_checkpoint --device cuda --num-requests 1000

Reports offline throughput (output tokens/s over all requests submitted at once), time to first token
(TTFT), time per output token after the first (TPOT) and inter-token latency (ITL), and batch-1 decode
latency; then the same prompts (a slice, --hf-requests) through HF transformers' generate().
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


async def _stream_all(llm, prompts, params):
    """Submits every prompt at once and records each token's arrival time."""
    start = now()

    async def one(prompt):
        arrivals = []
        async for out in llm.generate_async(prompt, params, streaming=True):
            arrivals += [now()] * len(out.outputs[0].token_ids_diff)
        return arrivals

    arrivals = await asyncio.gather(*(one(p) for p in prompts))
    return start, now(), arrivals


def bench_rtllm(model_dir, prompts, osl, args):
    from rtllm import LLM, BuildConfig, SamplingParams

    isl = len(prompts[0])
    build_config = BuildConfig(max_batch_size=args.max_batch_size, max_input_len=isl,
                               max_seq_len=isl + osl, max_num_tokens=args.max_num_tokens,
                               dtype=args.dtype)
    params = SamplingParams(max_tokens=osl, temperature=0.0, ignore_eos=True)
    results = {}
    with LLM(model=model_dir, build_config=build_config, skip_tokenizer_init=True,
             device=args.device) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        start, end, arrivals = asyncio.run(_stream_all(llm, prompts, params))
        num_out = sum(len(a) for a in arrivals)
        results["throughput"] = {
            "num_requests": len(prompts), "output_tokens": num_out, "seconds": end - start,
            "output_tokens_per_s": num_out / (end - start),
            "ttft": summarize([a[0] - start for a in arrivals]),
            "tpot": summarize([(a[-1] - a[0]) / (len(a) - 1) for a in arrivals if len(a) > 1]),
            "itl": summarize(np.concatenate([np.diff(a) for a in arrivals])),
        }
        start, end, arrivals = asyncio.run(_stream_all(llm, prompts[:1], params))
        a = arrivals[0]
        results["batch1"] = {"ttft_ms": (a[0] - start) * 1e3,
                             "tpot_ms": (a[-1] - a[0]) / (len(a) - 1) * 1e3,
                             "output_tokens_per_s": (len(a) - 1) / (a[-1] - a[0])}
    return results


def bench_hf(model_dir, prompts, osl, args):
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

    generate(prompts[:1], 4)  # warm-up
    results = {}
    batch = prompts[:args.hf_requests]
    start = now()
    generate(batch, osl)
    seconds = now() - start
    results["throughput"] = {"num_requests": len(batch), "output_tokens": len(batch) * osl,
                             "seconds": seconds, "output_tokens_per_s": len(batch) * osl / seconds}
    start = now()
    generate(prompts[:1], osl)
    seconds = now() - start
    results["batch1"] = {"tpot_ms": seconds / osl * 1e3, "output_tokens_per_s": osl / seconds}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF checkpoint directory")
    source.add_argument("--preset", help="a named shape with random weights (rtllm.models.presets)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--isl", type=int, default=128, help="input tokens per request")
    parser.add_argument("--osl", type=int, default=64, help="output tokens per request")
    parser.add_argument("--hf-requests", type=int, default=None, help="requests for HF (default: all)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-num-tokens", type=int, default=8192)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    args.hf_requests = args.hf_requests or args.num_requests

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if args.preset:
            from rtllm.models.presets import write_random_checkpoint
            dtype = "float32" if args.dtype == "auto" else args.dtype
            model_dir = write_random_checkpoint(os.path.join(tmp, args.preset), args.preset, dtype=dtype)
        import json
        with open(os.path.join(model_dir, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
        prompts = random_prompts(args.num_requests, args.isl, vocab_size)
        results = {"model": args.model or args.preset, "dtype": args.dtype, "device": args.device,
                   "isl": args.isl, "osl": args.osl, "cpu_count": os.cpu_count(),
                   "rtllm": bench_rtllm(model_dir, prompts, args.osl, args)}
        if not args.skip_hf:
            results["hf_transformers"] = bench_hf(model_dir, prompts, args.osl, args)

    rows = []
    for engine in ("rtllm", "hf_transformers"):
        if engine in results:
            r = results[engine]
            rows.append({"engine": engine, "requests": r["throughput"]["num_requests"],
                         "output tok/s": r["throughput"]["output_tokens_per_s"],
                         "TTFT p50 ms": r["throughput"].get("ttft", {}).get("p50_ms"),
                         "TPOT p50 ms": r["throughput"].get("tpot", {}).get("p50_ms"),
                         "batch-1 TPOT ms": r["batch1"]["tpot_ms"]})
    report(results, rows, ["engine", "requests", "output tok/s", "TTFT p50 ms", "TPOT p50 ms",
                           "batch-1 TPOT ms"], args.output)


if __name__ == "__main__":
    main()
