"""rtllm's CPU attention op against torch's scaled_dot_product_attention (float32), same shapes, same run.

rtllm's attention runs through a one-op engine (embedding -> attention -> gather_rows; written by
tests/python/test_cpu_attention.py) with llama-30m's heads (8 q heads, 4 kv heads, head_dim 64), so
its time is a whole runner step: the embedding gather of the fused qkv rows, RoPE and the KV cache
write, then attention over the paged cache. The "overhead" row is the same step without the attention
node; "rtllm - overhead" estimates the op alone. torch gets q, k, v already roped and contiguous.
Cases: prefill of 32 sequences x 128 tokens (causal) and a decode step of 32 sequences at 192 cached
tokens. Each row gives the median over --reps calls and the spread (p10..p90).

Usage: python benchmarks/bench_cpu_attention.py [--threads 2] [--reps 20] [--cases prefill decode]
       [--no-torch] [--output results.json]
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
from timing import report, time_calls  # noqa: E402
from test_cpu_attention import write_attention_engine  # noqa: E402
from engine_fixture import engine_config, write_safetensors  # noqa: E402
from rtllm import _core  # noqa: E402

NH, NKV, HD = 8, 4, 64
NUM_SEQS, PREFILL_LEN, DECODE_CTX = 32, 128, 192
TPB = 32


def write_overhead_engine(path, width, vocab):
    """embedding -> gather_rows with the attention engine's row width: the step without attention."""
    nodes = [{"op": "embedding", "inputs": ["input_ids", "E"], "outputs": ["x"], "attrs": {}},
             {"op": "gather_rows", "inputs": ["x", "last_token_ids"], "outputs": ["logits"], "attrs": {}}]
    tensors = [{"name": "x", "dtype": "float32", "shape": ["num_tokens", vocab]},
               {"name": "logits", "dtype": "float32", "shape": ["num_seqs", vocab]}]
    cfg = json.loads((path.parent / "attn" / "config.json").read_text())
    limits = cfg["build_config"]
    config = engine_config(cfg["model_config"], {k: limits[k] for k in limits if k != "fuse"}, tensors, nodes)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    table = np.random.default_rng(0).standard_normal((vocab, vocab)).astype(np.float32)
    write_safetensors(path / "rank0.engine", {"E": ("F32", table.shape, table.tobytes())})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--cases", nargs="*", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--output")
    args = parser.parse_args()

    max_tokens = NUM_SEQS * DECODE_CTX
    blocks_per_seq = -(-(DECODE_CTX + 1) // TPB)
    table = np.arange(NUM_SEQS * blocks_per_seq, dtype=np.int32).reshape(NUM_SEQS, blocks_per_seq)
    rng = np.random.default_rng(0)
    vocab = NH * HD
    cases = {"prefill": ([PREFILL_LEN] * NUM_SEQS, [0] * NUM_SEQS),
             "decode": ([1] * NUM_SEQS, [DECODE_CTX] * NUM_SEQS)}
    results, rows = {"threads": args.threads, "reps": args.reps, "rows": []}, []
    with tempfile.TemporaryDirectory() as tmp:
        write_attention_engine(Path(tmp) / "attn", NH, NKV, HD, max_num_tokens=max_tokens,
                               max_seq_len=DECODE_CTX + 8, num_layers=1)
        write_overhead_engine(Path(tmp) / "overhead", (NH + 2 * NKV) * HD, vocab)
        cfg = _core.RuntimeConfig(tokens_per_block=TPB, num_kv_blocks=table.size, num_threads=args.threads,
                                  max_num_tokens=max_tokens, max_batch_size=NUM_SEQS)
        runners = {name: _core.ModelRunner(_core.Engine.load(str(Path(tmp) / name)), cfg)
                   for name in ("attn", "overhead")}
        # fill the cache for the decode case
        ids = [int(t) for t in rng.integers(0, vocab, NUM_SEQS * DECODE_CTX)]
        runners["attn"].forward(ids, [DECODE_CTX] * NUM_SEQS, [0] * NUM_SEQS, table)
        for case in args.cases:
            num_new, num_cached = cases[case]
            ids = [int(t) for t in rng.integers(0, vocab, sum(num_new))]
            times = {name: time_calls(lambda r=r: r.forward(ids, num_new, num_cached, table), args.reps)
                     for name, r in runners.items()}
            times["rtllm - overhead"] = times["attn"] - times["overhead"][1]
            times["rtllm"] = times.pop("attn")
            if not args.no_torch:
                times["torch sdpa"] = time_torch(case, num_new[0], num_cached[0], args)
            for name, (p10, p50, p90) in times.items():
                row = {"case": case, "engine": name, "p50_ms": p50 * 1e3, "p10_ms": p10 * 1e3, "p90_ms": p90 * 1e3}
                results["rows"].append(row)
                rows.append(row)
    report(results, rows, ["case", "engine", "p50_ms", "p10_ms", "p90_ms"], args.output)


def time_torch(case, num_new, num_cached, args):
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ctx = num_cached + num_new
    q = torch.randn(NUM_SEQS, NH, num_new, HD, generator=g)
    k = torch.randn(NUM_SEQS, NKV, ctx, HD, generator=g)
    v = torch.randn(NUM_SEQS, NKV, ctx, HD, generator=g)
    causal = case == "prefill"
    with torch.inference_mode():
        return time_calls(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
                          args.reps)


if __name__ == "__main__":
    main()
