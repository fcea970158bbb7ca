"""Time to first token with and without a shared cached prefix, same model, same run.

Every request is a long shared prefix (a system prompt) followed by its own short suffix. Three
runs: reuse off (every request computes its whole prompt); full-block reuse (the prefix's full
blocks are computed once, later requests compute the rest of the prefix's last block and their
suffix); and partial reuse on top (the leading tokens of that last block are copied from the cached
block it shares them with, so later requests compute only their suffix). The default prefix ends
mid-block (16 tokens into its 33rd block of 32) so that the third run differs from the second; the
suffix must fill the rest of that block, since only full blocks are cached. Requests run one at a
time (TTFT without queueing) after one warm-up request that also fills the cache.

  python benchmarks/bench_prefix_reuse.py --preset llama-30m --prefix-len 1040 --suffix-len 32
"""
import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import now, report, summarize  # noqa: E402


def measure(model_dir, prompts, reuse, partial, args):
    from rtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams

    prompt_len = max(len(p) for p in prompts)
    build_config = BuildConfig(max_batch_size=4, max_input_len=prompt_len, max_seq_len=prompt_len + 8,
                               max_num_tokens=prompt_len, dtype=args.dtype)
    kv = KvCacheConfig(max_tokens=4 * (prompt_len + 8), tokens_per_block=args.tokens_per_block,
                       enable_block_reuse=reuse, enable_partial_reuse=partial)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    with LLM(model_dir, build_config=build_config, kv_cache_config=kv, skip_tokenizer_init=True,
             device=args.device) as llm:
        llm.generate(prompts[0], params, use_tqdm=False)  # warm-up; caches the prefix
        first = [None] * len(prompts)
        ttft = []
        for i, prompt in enumerate(prompts[1:], 1):
            start = now()
            first[i] = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
            ttft.append(now() - start)
        stats = llm.get_stats()
    return {"ttft_ms": summarize(ttft), "first_tokens": first[1:],
            "num_context_tokens": stats["num_context_tokens"],
            "num_reused_tokens": stats["kv_cache"]["num_reused_tokens"],
            "num_partial_reused_blocks": stats["kv_cache"]["num_partial_reused_blocks"],
            "hit_rate": stats["kv_cache"]["hit_rate"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-30m", help="a named shape with random weights")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prefix-len", type=int, default=1040, help="default: 32.5 blocks of 32")
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--num-requests", type=int, default=9, help="including the warm-up request")
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    from rtllm.models.presets import write_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_checkpoint(os.path.join(tmp, args.preset), args.preset, dtype=args.dtype)
        rng = np.random.default_rng(0)
        prefix = rng.integers(10, 1000, size=args.prefix_len).tolist()
        prompts = [prefix + rng.integers(10, 1000, size=args.suffix_len).tolist()
                   for _ in range(args.num_requests)]
        off = measure(model_dir, prompts, False, False, args)
        full = measure(model_dir, prompts, True, False, args)
        on = measure(model_dir, prompts, True, True, args)
    for name, r in (("full-block reuse", full), ("partial reuse", on)):
        if r["first_tokens"] != off["first_tokens"]:
            raise SystemExit(f"{name} changed the first tokens: {r['first_tokens']} vs {off['first_tokens']}")
    results = {"preset": args.preset, "dtype": args.dtype, "device": args.device, "cpu_count": os.cpu_count(),
               "prefix_len": args.prefix_len, "suffix_len": args.suffix_len,
               "tokens_per_block": args.tokens_per_block, "num_timed_requests": args.num_requests - 1,
               "reuse_off": off, "reuse_full_blocks": full, "reuse_on": on,
               "ttft_speedup_p50": off["ttft_ms"]["p50_ms"] / on["ttft_ms"]["p50_ms"],
               "ttft_speedup_p50_full_blocks": off["ttft_ms"]["p50_ms"] / full["ttft_ms"]["p50_ms"]}
    rows = [{"block_reuse": name, "ttft_p50_ms": r["ttft_ms"]["p50_ms"], "ttft_mean_ms": r["ttft_ms"]["mean_ms"],
             "context_tokens": r["num_context_tokens"], "reused_tokens": r["num_reused_tokens"],
             "partial_blocks": r["num_partial_reused_blocks"]}
            for name, r in (("off", off), ("full blocks", full), ("full + partial", on))]
    report(results, rows, ["block_reuse", "ttft_p50_ms", "ttft_mean_ms", "context_tokens", "reused_tokens",
                           "partial_blocks"], args.output)


if __name__ == "__main__":
    main()
