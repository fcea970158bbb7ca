"""Host cost of admitting requests into a KV-cache pool full of cached prompts, by pool size.

A server in steady state admits a few dozen requests per step into a pool whose free room is mostly
cached prefixes of finished requests. Each admission looks its prompt up (full blocks, then the best
partial block among the cached first blocks), takes blocks (evicting cached ones) and, once computed,
registers them; a finished request releases them. This times that cycle on the KV-cache manager alone,
for pools from a CPU-sized one to an H200's (an 8B model's FP8 KV cache fills ~50,000 blocks of 32
tokens there), with random prompts as in bench_e2e.py. The cost should not grow with the pool.

  python benchmarks/bench_kv_admission.py --num-blocks 2000 --num-blocks 50000
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import now  # noqa: E402


def admission_ms(num_blocks, args):
    """Median milliseconds to admit, compute and finish args.batch prompts, once the pool is full."""
    from rtllm import _core

    kv = _core.KVCacheManager(num_blocks, args.tokens_per_block)
    rng = np.random.default_rng(0)
    next_seq = iter(range(1 << 62))

    def cycle():
        start = now()
        seqs = []
        for _ in range(args.batch):
            tokens = rng.integers(10, args.vocab_size, size=args.prompt_len).tolist()
            seq = next(next_seq)
            kv.allocate(seq, len(tokens), kv.match_prefix(tokens, len(tokens), 0), 0)
            kv.finish_copies()
            kv.store(seq, tokens, len(tokens))
            seqs.append(seq)
        seconds = now() - start
        for seq in seqs:
            kv.free(seq)
        return seconds

    while kv.stats().num_free_blocks > kv.stats().num_reusable_blocks + args.batch * 8:  # fill with cached prompts
        cycle()
    return 1e3 * float(np.median([cycle() for _ in range(args.repeats)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-blocks", type=int, action="append", help="pool sizes (default 2000, 20000, 50000)")
    parser.add_argument("--batch", type=int, default=51, help="admissions per step")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--tokens-per-block", type=int, default=32)
    parser.add_argument("--vocab-size", type=int, default=128256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    rows = [{"num_blocks": n, "ms_per_step": admission_ms(n, args)} for n in args.num_blocks or [2000, 20000, 50000]]
    for row in rows:
        print(f"{row['num_blocks']:>8} blocks: {row['ms_per_step']:.3f} ms to admit {args.batch} prompts of "
              f"{args.prompt_len} tokens")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
