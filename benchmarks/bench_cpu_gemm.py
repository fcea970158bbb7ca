"""rtllm's CPU linear op against numpy.matmul and torch.matmul (float32), same shapes, same run.

rtllm's linear runs through a one-linear engine (embedding -> linear -> gather_rows, one token per
sequence; tests/python/test_cpu_linear.py writes it), so its time includes a whole runner step: the
embedding gather of x and the copy of y out, which the library rows do not pay. The shapes are those of
llama-30m (hidden 512, intermediate 1408, vocab 8192) at decode (M = 1, 32) and prefill (M = 512, 4096).
The rowmajor rows run rtllm's linear on a W that the embedding reads too (as with tied embeddings),
which the runner leaves row-major [N, K] for the inner-product kernel instead of packing it.
Each row gives the median over --reps calls, the spread (p10..p90) and GFLOP/s (2 M N K / time).
--dtype bfloat16 / float16 stores W 16-bit (rtllm keeps it so and widens it as it reads, or on a CPU with
AMX-BF16 multiplies it on AMX tiles: bfloat16 unless RTLLM_CPU_AMX=0, float16 with RTLLM_CPU_AMX=1; numpy
and torch multiply the same widened values in float32), and adds the weight bytes streamed per second at
the median.

--model runs a whole model instead, through the C++ runner alone (no executor, no sampling): an HF
checkpoint (built into a temporary engine, weights in the checkpoint's dtype) or an engine directory.
It reports the process's resident memory after load (anonymous: the runner's own weights, workspace and
touched KV pool; file: pages of the mapped engine read in place) and the best of --reps rounds of a
--isl-token prefill and of --decode-steps batch-1 decode steps after it (ms per token).

Usage: python benchmarks/bench_cpu_gemm.py [--threads 2] [--reps 20] [--dtype float32] [--output results.json]
       python benchmarks/bench_cpu_gemm.py --model CHECKPOINT_OR_ENGINE [--threads 2] [--reps 5]
"""
import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
from timing import now, report, time_calls  # noqa: E402
from engine_fixture import bf16_bits_to_float, float_to_bf16_bits  # noqa: E402
from test_cpu_linear import LinearRunner, write_linear_engine  # noqa: E402

SHAPES = [("qkv", 512, 1024), ("o_proj", 512, 512), ("gate_up", 512, 2816), ("down", 1408, 512),
          ("lm_head", 512, 8192)]  # (name, K, N)
ROWS = [1, 32, 512, 4096]


def as_dtype(w, dtype):
    """w rounded to dtype's values (nearest even), as float32."""
    if dtype == "bfloat16":
        return bf16_bits_to_float(float_to_bf16_bits(w))
    return w.astype(np.float16).astype(np.float32) if dtype == "float16" else w


def resident_mib():
    """(anonymous, file-backed) resident memory of this process, MiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile"))


def bench_model(args):
    from rtllm import _core
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.model
        if not os.path.exists(os.path.join(engine_dir, "rank0.engine")):
            # Built in a child process, so that its memory does not count in this one's.
            engine_dir = os.path.join(tmp, "engine")
            build = ("import sys, rtllm; from rtllm.models import AutoModelForCausalLM as A; "
                     "isl, steps = int(sys.argv[3]), int(sys.argv[4]); "
                     "c = rtllm.BuildConfig(max_batch_size=1, max_input_len=isl, max_seq_len=isl + steps, "
                     "max_num_tokens=isl); rtllm.build(A.from_hugging_face(sys.argv[1]), c).save(sys.argv[2])")
            subprocess.run([sys.executable, "-c", build, args.model, engine_dir, str(args.isl),
                            str(args.decode_steps)], check=True)
        anon0, file0 = resident_mib()
        engine = _core.Engine.load(engine_dir)
        tokens_per_block = 16
        num_blocks = -(-(args.isl + args.decode_steps) // tokens_per_block)
        runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=num_blocks,
                                                               tokens_per_block=tokens_per_block,
                                                               num_threads=args.threads))
        table = np.arange(num_blocks, dtype=np.int32)[None, :]
        prompt = np.random.default_rng(0).integers(10, engine.vocab_size, args.isl).astype(np.int32)
        runner.forward(prompt, [args.isl], [0], table)  # the first step commits the workspace's pages
        anon, file = resident_mib()
        prefill, decode = [], []
        for _ in range(args.reps):
            t0 = now()
            runner.forward(prompt, [args.isl], [0], table)
            prefill.append(now() - t0)
            t0 = now()
            for i in range(args.decode_steps):
                runner.forward(prompt[i:i + 1], [1], [args.isl + i], table)
            decode.append((now() - t0) / args.decode_steps)
    row = {"model": args.model, "threads": args.threads, "isl": args.isl,
           "rss_anon_MiB": anon - anon0, "rss_file_MiB": file - file0,
           "prefill_ms": min(prefill) * 1e3, "decode_ms_per_token": min(decode) * 1e3,
           "prefill_all_ms": [round(t * 1e3, 2) for t in prefill],
           "decode_all_ms": [round(t * 1e3, 2) for t in decode]}
    report(row, [row], ["threads", "isl", "rss_anon_MiB", "rss_file_MiB", "prefill_ms", "decode_ms_per_token"],
           args.output)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--rows", type=int, nargs="*", default=ROWS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the stored dtype of W")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--model", help="an HF checkpoint or engine directory: time prefill and decode")
    parser.add_argument("--isl", type=int, default=128, help="--model: prompt tokens")
    parser.add_argument("--decode-steps", type=int, default=32, help="--model: decode steps per round")
    parser.add_argument("--output")
    args = parser.parse_args()
    if args.model:
        return bench_model(args)
    torch = None
    if not args.no_torch:
        import torch
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    results, rows = {"threads": args.threads, "reps": args.reps, "dtype": args.dtype, "rows": []}, []
    weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    max_rows = max(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        for name, K, N in SHAPES:
            table = rng.standard_normal((N, K)).astype(np.float32)
            weight = as_dtype((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32), args.dtype)
            path = write_linear_engine(Path(tmp) / name, table, weight, max_rows=max_rows, weight_dtype=args.dtype)
            runner = LinearRunner(path, num_threads=args.threads, max_rows=max_rows)
            # W doubling as the embedding table stays row-major: the inner-product kernel for such weights
            tied = write_linear_engine(Path(tmp) / (name + "_tied"), weight, weight, max_rows=max_rows,
                                       weight_dtype=args.dtype)
            rowmajor = LinearRunner(tied, num_threads=args.threads, max_rows=max_rows)
            for M in args.rows:
                ids = rng.integers(0, N, M)
                x = table[ids]
                flop = 2.0 * M * N * K
                row = {"shape": name, "M": M, "K": K, "N": N}
                engines = {"rtllm": lambda: runner(ids), "rowmajor": lambda: rowmajor(ids),
                           "numpy": lambda: np.matmul(x, weight.T)}
                if torch is not None:
                    xt, wt = torch.from_numpy(x), torch.from_numpy(weight)
                    engines["torch"] = lambda: torch.matmul(xt, wt.T)
                for engine, fn in engines.items():
                    p10, p50, p90 = time_calls(fn, args.reps)
                    row[f"{engine}_ms"] = p50 * 1e3
                    row[f"{engine}_spread_ms"] = f"{p10 * 1e3:.3g}..{p90 * 1e3:.3g}"
                    row[f"{engine}_gflops"] = flop / p50 / 1e9
                    if engine in ("rtllm", "rowmajor"):
                        row[f"{engine}_weight_GBps"] = N * K * weight_bytes / p50 / 1e9
                results["rows"].append(row)
                rows.append(row)
    columns = ["shape", "M", "K", "N", "rtllm_ms", "rtllm_gflops", "rowmajor_gflops", "rtllm_weight_GBps",
               "rowmajor_weight_GBps", "numpy_gflops"]
    if torch is not None:
        columns.append("torch_gflops")
    columns += ["rtllm_spread_ms"]
    report(results, rows, columns, args.output)


if __name__ == "__main__":
    main()
