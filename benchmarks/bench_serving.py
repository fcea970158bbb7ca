"""`rtllm bench throughput` (the LLM API) next to `rtllm bench serve` (a running `rtllm serve`) on one
model and one workload, every request submitted at once in both: the two should agree on token counts
and come close on throughput and latency, the server adding HTTP, JSON and detokenization per streamed
chunk (--max-concurrency caps the server's in-flight requests instead, as a closed-loop client would).
Each sampling mode of --sampling (default: greedy, top-p and top-k) runs through both.

  python benchmarks/bench_serving.py --preset llama-3-8b --device cuda --num-requests 1000 \\
      --input-len 128 --output-len 128 --max-batch-size 256

Runs the `rtllm` command itself (as a user would), each engine in its own process, and prints both
reports' JSON and a table side by side.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import SAMPLING  # noqa: E402
from timing import report  # noqa: E402

METRICS = ("ttft", "tpot", "itl", "e2e")


def sampling_flags(mode: str) -> list:
    """`rtllm bench` flags of one of bench_e2e.py's sampling modes (its seed is the benchmark's own)."""
    flags = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k"}
    return [arg for key, value in SAMPLING[mode].items() if key in flags for arg in (flags[key], str(value))]


def wait_for_server(url: str, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"rtllm serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"rtllm serve did not answer /health within {timeout_s} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="an HF checkpoint directory with a tokenizer")
    source.add_argument("--preset", help="a named shape with random weights and a placeholder tokenizer")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="most requests in flight at the server (default: all at once, as offline)")
    parser.add_argument("--sampling", nargs="+", choices=sorted(SAMPLING), default=["greedy", "topp", "topk"],
                        help="sampling modes, each run through both paths (bench_e2e.py's: greedy; temperature 0.8 "
                             "with top-p 0.95; temperature 0.8 with top-k 50)")
    parser.add_argument("--port", type=int, default=8431)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if args.preset:
            from rtllm.models.presets import write_random_checkpoint
            model = write_random_checkpoint(os.path.join(tmp, args.preset), args.preset, dtype=args.dtype,
                                            tokenizer=True)
        engine = ["--device", args.device, "--dtype", args.dtype, "--max-batch-size", str(args.max_batch_size),
                  "--max-input-len", str(args.input_len), "--max-seq-len", str(args.input_len + args.output_len)]
        workload = ["--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                    "--output-len", str(args.output_len), "--no-progress"]
        rtllm = [sys.executable, "-m", "rtllm.cli"]
        url = f"http://127.0.0.1:{args.port}"
        concurrency = ["--max-concurrency", str(args.max_concurrency)] if args.max_concurrency else []
        offline, serve = {}, {}
        for mode in args.sampling:
            offline_json = os.path.join(tmp, f"offline_{mode}.json")
            subprocess.run(rtllm + ["bench", "throughput", model, *engine, *workload, *sampling_flags(mode),
                                    "--output-json", offline_json], check=True)
            with open(offline_json) as f:
                offline[mode] = json.load(f)
        server = subprocess.Popen(rtllm + ["serve", model, "--port", str(args.port), "--log-level", "warning",
                                           *engine])
        try:
            wait_for_server(url, server, timeout_s=600)
            for mode in args.sampling:
                serve_json = os.path.join(tmp, f"serve_{mode}.json")
                subprocess.run(rtllm + ["bench", "serve", "--base-url", url, "--tokenizer", model, *workload,
                                        *concurrency, *sampling_flags(mode), "--output-json", serve_json], check=True)
                with open(serve_json) as f:
                    serve[mode] = json.load(f)
        finally:
            server.terminate()
            server.wait(timeout=60)

    results = {"model": args.model or args.preset, "device": args.device, "throughput": offline, "serve": serve}
    rows = []
    for mode in args.sampling:
        for name, r in (("bench throughput", offline[mode]), ("bench serve", serve[mode])):
            row = {"mode": name, "sampling": mode, "requests": r["num_completed"],
                   "output tokens": r["total_output_tokens"], "output tok/s": r["output_token_throughput"]}
            for key in METRICS:
                row[f"{key} p50 ms"] = r[key].get("p50_ms")
            rows.append(row)
    report(results, rows, ["mode", "sampling", "requests", "output tokens", "output tok/s"] +
           [f"{k} p50 ms" for k in METRICS], args.output)

if __name__ == "__main__":
    main()
