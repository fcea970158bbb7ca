"""The `rtllm bench` command: throughput and latency of a model through the LLM API, or of a
running server through its OpenAI-compatible API, on a random or JSONL workload."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys

from rtllm.bench.dataset import load_jsonl, random_requests
from rtllm.bench.metrics import compute_metrics, format_table
from rtllm.bench.runner import run_requests, warm_up

DEFAULT_NUM_REQUESTS = 64


def _int_at_least(minimum: int):
    """An argparse type: an int >= minimum."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value
    return parse


_positive_int = _int_at_least(1)


def _add_engine_args(p) -> None:
    from rtllm.builder import DTYPES
    from rtllm.quantization.cli_args import add_quant_args

    p.add_argument("model", metavar="MODEL", help="engine or HF checkpoint directory")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: MODEL)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight dtype when building an HF checkpoint")
    p.add_argument("--max-batch-size", type=_positive_int, default=None)
    p.add_argument("--max-num-tokens", type=_positive_int, default=None)
    p.add_argument("--max-input-len", type=_positive_int, default=None,
                   help="default for an HF checkpoint: the workload's longest prompt")
    p.add_argument("--max-seq-len", type=_positive_int, default=None,
                   help="default for an HF checkpoint: the workload's longest prompt + output")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=_positive_int, default=1,
                   help="tensor-parallel ranks, one process each (default 1)")
    add_quant_args(p)


def _add_dataset_args(p) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset", default="random", metavar="random|FILE.jsonl",
                   help="random token-id prompts, or a JSONL file of {prompt | input_ids, output_tokens}")
    g.add_argument("--num-requests", type=_positive_int, default=None,
                   help=f"requests to send (default: {DEFAULT_NUM_REQUESTS} random ones, or the whole file)")
    g.add_argument("--input-len", type=_positive_int, default=128, help="mean prompt tokens (random)")
    g.add_argument("--output-len", type=_positive_int, default=128, help="mean output tokens (random)")
    g.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths are uniform in [len * (1 - r), len * (1 + r)] (random; default 0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random workload and of Poisson arrivals")
    g.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed requests sent first, one at a time")


def _add_load_args(p) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    g.add_argument("--max-concurrency", type=_positive_int, default=None, help="most requests in flight")


def _add_common_args(p) -> None:
    g = p.add_argument_group("sampling (every request runs to its output length: ignore_eos)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    p.add_argument("--output-json", metavar="FILE", default=None, help="also write the report as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_bench_parser(subparsers) -> None:
    """Adds `bench` and its modes to the `rtllm` command's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark a model or a running server",
                              description="Measure request and token throughput, TTFT, TPOT, ITL and "
                                          "end-to-end latency (mean, p50, p90, p99).")
    modes = p.add_subparsers(dest="bench_mode", metavar="MODE")
    modes.required = True

    t = modes.add_parser("throughput", help="offline: every request through the LLM API at once",
                         description="Submit the workload through the LLM API (all at once unless "
                                     "--request-rate / --max-concurrency say otherwise).")
    _add_engine_args(t)
    _add_dataset_args(t)
    _add_load_args(t)
    _add_common_args(t)
    t.set_defaults(func=_run_offline)

    lat = modes.add_parser("latency", help="one request at a time through the LLM API",
                           description="Send the workload through the LLM API one request at a time.")
    _add_engine_args(lat)
    _add_dataset_args(lat)
    _add_common_args(lat)
    lat.set_defaults(func=_run_offline, request_rate=math.inf, max_concurrency=1)

    s = modes.add_parser("serve", help="drive a running server through /v1/completions",
                         description="Stream the workload from a running OpenAI-compatible server.")
    s.add_argument("--base-url", default="http://127.0.0.1:8000", help="default http://127.0.0.1:8000")
    s.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    s.add_argument("--api-key", default=os.environ.get("RTLLM_API_KEY"),
                   help="bearer key (default: $RTLLM_API_KEY)")
    s.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="the served model's directory, for the vocabulary of random prompts "
                        "(default: --model, when it is a directory)")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take (default 600)")
    _add_dataset_args(s)
    _add_load_args(s)
    _add_common_args(s)
    s.set_defaults(func=_run_serve)


def _load_requests(args, vocab_dir) -> list:
    if args.dataset != "random":
        return load_jsonl(args.dataset, args.num_requests)
    if vocab_dir is None:
        raise ValueError("random prompts need the model's vocabulary: pass --tokenizer DIR")
    from rtllm.bench.offline import vocab_bound
    return random_requests(args.num_requests or DEFAULT_NUM_REQUESTS, args.input_len, args.output_len,
                           vocab_bound(vocab_dir), args.range_ratio, args.seed)


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


async def _benchmark(send, requests, args) -> tuple:
    await warm_up(send, requests, args.warmup)
    return await run_requests(send, requests, args.request_rate, args.max_concurrency, args.seed,
                              progress=not args.no_progress)


def _report(args, title: str, model: str, records, duration_s: float) -> None:
    metrics = compute_metrics(records, duration_s)
    print(format_table(title, metrics), flush=True)
    if args.output_json:
        config = {"model": model, "base_url": getattr(args, "base_url", None), "dataset": args.dataset,
                  "input_len": args.input_len, "output_len": args.output_len,
                  "range_ratio": args.range_ratio, "seed": args.seed,
                  "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
                  "max_concurrency": args.max_concurrency, **_sampling(args)}
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump({"mode": args.bench_mode, "config": config, **metrics}, f, indent=2)
            f.write("\n")
    if metrics["num_failed"]:
        print(f"rtllm bench: {metrics['num_failed']} of {len(records)} requests failed", file=sys.stderr)
        raise SystemExit(1)


def _run_offline(args) -> None:
    from rtllm import LLM
    from rtllm.quantization.cli_args import quant_config_of
    from rtllm.bench.offline import engine_limits, llm_sender, tokenize_prompts

    tokenizer_dir = args.tokenizer or args.model
    requests = tokenize_prompts(_load_requests(args, tokenizer_dir), tokenizer_dir)
    limits = engine_limits(args.model, requests, args.max_input_len, args.max_seq_len, args.max_num_tokens)
    with LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
             max_batch_size=args.max_batch_size, quant_config=quant_config_of(args), tensor_parallel_size=args.tp,
             **limits) as llm:
        send = llm_sender(llm, _sampling(args))
        records, duration_s = asyncio.run(_benchmark(send, requests, args))
    _report(args, f"rtllm bench {args.bench_mode}", args.model, records, duration_s)


async def _serve_benchmark(args) -> tuple:
    from rtllm.bench.serve_client import make_client, served_models, server_sender

    async with make_client(args.base_url, args.api_key, args.timeout) as client:
        models = await served_models(client)
        model = args.model or (models[0]["id"] if models else None)
        if model is None:
            raise ValueError(f"{args.base_url} serves no model")
        vocab_dir = next((d for d in (args.tokenizer, args.model) if d and os.path.isdir(d)), None)
        requests = _load_requests(args, vocab_dir)
        records, duration_s = await _benchmark(server_sender(client, model, _sampling(args)), requests, args)
    return model, records, duration_s


def _run_serve(args) -> None:
    model, records, duration_s = asyncio.run(_serve_benchmark(args))
    _report(args, "rtllm bench serve", model, records, duration_s)
