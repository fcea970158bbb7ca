"""CPU speed of rtllm's weight formats on one model: batch-1 decode time per token (TPOT) and the time of
one prefill step, for the unquantized engine and W8A16 / W4A16 (weight-only int8 per channel, int4 per group).

Each engine is built from the HF checkpoint (default: SmolLM2-135M-Instruct, tests/python/smollm2.py) and
run on the CPU model runner directly (no scheduler, no sampling): one prefill step of --prefill tokens,
then --decode steps of one token each for the same sequence. The decode rows give the minimum and the
median over the steps of each of --repeats runs (the minimum over runs: single runs on a shared machine
are noisy); the prefill rows the minimum over the runs. Needs no GPU.

    python benchmarks/bench_cpu_quant.py [CHECKPOINT_DIR] --threads 2 --formats none W8A16 W4A16:32
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import report  # noqa: E402


def quant_config_of(fmt: str):
    """'none' | 'W8A16' | 'W4A16[:group_size][:zp]' -> QuantConfig or None."""
    from rtllm.quantization import QuantConfig

    if fmt == "none":
        return None
    algo, *rest = fmt.split(":")
    fields = dict(quant_algo=algo)
    for r in rest:
        if r == "zp":
            fields["has_zero_point"] = True
        else:
            fields["group_size"] = int(r)
    return QuantConfig(**fields)


def engine_bytes(engine_dir: str) -> int:
    return os.path.getsize(os.path.join(engine_dir, "rank0.engine"))


def run_once(engine_dir: str, threads: int, prefill: int, decode: int, rng) -> tuple:
    """(prefill seconds, [decode step seconds]) of one sequence on a fresh runner."""
    from rtllm import _core

    engine = _core.Engine.load(engine_dir)
    tpb = 16
    blocks = -(-(prefill + decode) // tpb)
    cfg = _core.RuntimeConfig(tokens_per_block=tpb, num_kv_blocks=blocks + 1, num_threads=threads,
                              max_num_tokens=max(prefill, 1), max_batch_size=1)
    runner = _core.ModelRunner(engine, cfg)
    table = np.arange(blocks + 1, dtype=np.int32)[None, :]
    ids = rng.integers(2, engine.vocab_size, size=prefill + decode).tolist()
    t0 = time.perf_counter()
    runner.forward(ids[:prefill], [prefill], [0], table)
    t_prefill = time.perf_counter() - t0
    steps = []
    for i in range(decode):
        t0 = time.perf_counter()
        runner.forward([ids[prefill + i]], [1], [prefill + i], table)
        steps.append(time.perf_counter() - t0)
    return t_prefill, steps


def _default_checkpoint() -> str:
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
    from smollm2 import checkpoint_dir

    return checkpoint_dir()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="HF checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--formats", nargs="+", default=["none", "W8A16", "W4A16:32"],
                        help="none, W8A16, W4A16[:GROUP][:zp] (default: none W8A16 W4A16:32)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output")
    args = parser.parse_args()

    from rtllm.builder import BuildConfig, build
    from rtllm.models import AutoModelForCausalLM

    checkpoint = args.checkpoint or _default_checkpoint()
    model = AutoModelForCausalLM.from_hugging_face(checkpoint)
    rng = np.random.default_rng(0)
    results = {"checkpoint": checkpoint, "threads": args.threads, "prefill_tokens": args.prefill,
               "decode_steps": args.decode, "repeats": args.repeats, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats:
            engine_dir = os.path.join(tmp, fmt.replace(":", "_"))
            build(model, BuildConfig(max_seq_len=args.prefill + args.decode + 16,
                                     max_num_tokens=max(args.prefill, 1), max_batch_size=1),
                  quant_config_of(fmt)).save(engine_dir)
            prefills, mins, medians = [], [], []
            for _ in range(args.repeats):
                t_prefill, steps = run_once(engine_dir, args.threads, args.prefill, args.decode, rng)
                prefills.append(t_prefill)
                mins.append(min(steps))
                medians.append(float(np.median(steps)))
            results["rows"].append({
                "format": fmt, "engine_MB": round(engine_bytes(engine_dir) / 1e6, 1),
                "decode_ms_min": round(1e3 * min(mins), 2), "decode_ms_median": round(1e3 * min(medians), 2),
                "prefill_ms": round(1e3 * min(prefills), 1),
                "prefill_tok_per_s": round(args.prefill / min(prefills), 1)})
    report(results, results["rows"], ["format", "engine_MB", "decode_ms_min", "decode_ms_median", "prefill_ms",
                                      "prefill_tok_per_s"], args.output)


if __name__ == "__main__":
    main()
