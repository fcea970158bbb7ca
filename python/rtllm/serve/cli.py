"""`rtllm serve`: load a model and serve it over an OpenAI-compatible HTTP API."""
from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys

from rtllm.serve import DEFAULT_MAX_BODY_BYTES, require_serve_extra

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_serve_parser(subparsers) -> None:
    from rtllm.builder import DTYPES
    from rtllm.serve.limits import AdmissionLimits, ConnectionLimits

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve MODEL at /v1/completions, /v1/chat/completions and /v1/models, with "
                    "/tokenize, /detokenize, /health, /version, /metrics (Prometheus) and a chat page "
                    "at /. docs/serving.md lists the limits and conventions.")
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="engine or HF checkpoint directory (default: the built-in demo model)")
    p.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory (default: the model's)")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="the model name clients send (default: MODEL's directory name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("RTLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health "
                        "(default: $RTLLM_API_KEY, which keeps the key out of the process list)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"largest request body; larger ones get 413 (default {DEFAULT_MAX_BODY_BYTES})")
    p.add_argument("--chat-template", metavar="FILE_OR_TEXT", default=None,
                   help="jinja2 chat template for /v1/chat/completions, a file or the template itself "
                        "(default: the tokenizer's)")
    p.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="uvicorn's log level")
    limits = p.add_argument_group("limits (against overload and clients that hold connections)")
    conn, admission = ConnectionLimits(), AdmissionLimits()
    limits.add_argument("--header-timeout", type=float, default=conn.header_timeout_s, metavar="S",
                        help="close a connection whose request head has not arrived within S seconds "
                             f"(default {conn.header_timeout_s:g})")
    limits.add_argument("--body-timeout", type=float, default=admission.body_timeout_s, metavar="S",
                        help=f"answer 408 to a body not received within S seconds (default {admission.body_timeout_s:g})")
    limits.add_argument("--keep-alive-timeout", type=float, default=conn.keep_alive_timeout_s, metavar="S",
                        help=f"close an idle kept-alive connection after S seconds (default {conn.keep_alive_timeout_s:g})")
    limits.add_argument("--max-connections", type=int, default=None, metavar="N",
                        help=f"open connections at most; more are closed at once (default {conn.max_connections}, "
                             "lowered to fit the open-files limit)")
    limits.add_argument("--max-seqs-per-request", type=int, default=admission.max_seqs_per_request, metavar="N",
                        help="prompts x n one request may ask for; more: 400 "
                             f"(default {admission.max_seqs_per_request})")
    limits.add_argument("--max-waiting-seqs", type=int, default=admission.max_waiting_seqs, metavar="N",
                        help="sequences that may wait for the engine; a request past it gets 429 "
                             f"(default {admission.max_waiting_seqs})")
    limits.add_argument("--drain-timeout", type=float, default=conn.drain_timeout_s, metavar="S",
                        help="on SIGTERM or Ctrl+C, let running requests finish for S seconds, then "
                             f"end them with a final chunk (default {conn.drain_timeout_s:g})")
    engine = p.add_argument_group("engine")
    engine.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    engine.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weight dtype when MODEL is an HF checkpoint (auto: the checkpoint's)")
    # vLLM's flag names are aliases: --max-num-seqs, --max-model-len, --gpu-memory-utilization.
    engine.add_argument("--max-batch-size", "--max-num-seqs", dest="max_batch_size", type=int, default=None,
                        help="most sequences per step")
    engine.add_argument("--max-seq-len", "--max-model-len", dest="max_seq_len", type=int, default=None,
                        help="longest prompt + output")
    engine.add_argument("--max-input-len", type=int, default=None, help="longest prompt")
    engine.add_argument("--max-num-tokens", type=int, default=None, help="most tokens per step")
    engine.add_argument("--kv-cache-fraction", "--gpu-memory-utilization", dest="kv_cache_fraction",
                        type=float, default=None,
                        help="fraction of the memory free after the weights (device memory on CUDA, available "
                             "host memory on the CPU) for the KV cache (default 0.9)")
    engine.add_argument("--max-kv-tokens", type=int, default=None,
                        help="KV cache size in tokens (overrides --kv-cache-fraction)")
    engine.add_argument("--enable-chunked-prefill", action="store_true",
                        help="split long prompts into chunks that share steps with generation")
    engine.add_argument("--seed", type=int, default=0, help="seed of requests that give none")
    engine.add_argument("--num-threads", type=int, default=0, help="CPU threads (0: all cores)")
    engine.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                        help="tensor-parallel ranks, one process each (docs/parallelism.md; default 1)")
    p.set_defaults(func=run_serve)


def _listen(host: str, port: int) -> socket.socket:
    """Binds before the model loads, so a taken port fails at once."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port} must be in [0, 65535]")
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)


def _load_llm(args: argparse.Namespace):
    from rtllm import LLM, KvCacheConfig, SchedulerConfig

    kv_options = {"max_tokens": args.max_kv_tokens}
    if args.kv_cache_fraction is not None:
        kv_options["free_gpu_memory_fraction"] = args.kv_cache_fraction
    model = args.model
    if model is None:
        from rtllm.default_model import default_model_dir
        model = default_model_dir()
    llm = LLM(model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
              kv_cache_config=KvCacheConfig(**kv_options),
              scheduler_config=SchedulerConfig(enable_chunked_prefill=args.enable_chunked_prefill),
              max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
              max_input_len=args.max_input_len, max_num_tokens=args.max_num_tokens, seed=args.seed,
              num_threads=args.num_threads, tensor_parallel_size=args.tp)
    llm._entry_point = "rtllm serve"  # limit errors name this command's flags
    return llm, args.served_model_name or os.path.basename(os.path.normpath(model))


def _chat_template(value):
    """--chat-template: a file's contents, or the text itself when no such file exists (vLLM's)."""
    if value is None or not os.path.isfile(value):
        if value is not None and "{" not in value:
            raise ValueError(f"--chat-template={value!r} is neither a file nor a jinja2 template")
        return value
    with open(value, encoding="utf-8") as f:
        return f.read()


def run_serve(args: argparse.Namespace) -> None:
    try:
        require_serve_extra()
    except ImportError as e:
        raise SystemExit(f"rtllm serve: error: {e}") from None
    from rtllm.serve.app import build_app
    from rtllm.serve.limits import AdmissionLimits, ConnectionLimits
    from rtllm.serve.server import make_server, raise_fd_limit

    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes={args.max_body_bytes} must be >= 1")
    if args.api_key == "":
        raise ValueError("--api-key is empty: give a key or leave the option out")
    chat_template = _chat_template(args.chat_template)
    for flag, value in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout),
                        ("--keep-alive-timeout", args.keep_alive_timeout), ("--drain-timeout", args.drain_timeout)):
        if not value > 0:
            raise ValueError(f"{flag}={value:g} must be > 0 (seconds)")
    for flag, value in (("--max-connections", args.max_connections),
                        ("--max-seqs-per-request", args.max_seqs_per_request),
                        ("--max-waiting-seqs", args.max_waiting_seqs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    # Connections beyond the open-files limit would fail at accept; keep room for the model's files.
    fd_limit = raise_fd_limit()
    max_connections = args.max_connections
    if max_connections is None:
        max_connections = max(1, min(ConnectionLimits.max_connections, fd_limit - 64))
    conn_limits = ConnectionLimits(header_timeout_s=args.header_timeout, keep_alive_timeout_s=args.keep_alive_timeout,
                                   max_connections=max_connections, drain_timeout_s=args.drain_timeout)
    admission = AdmissionLimits(max_seqs_per_request=args.max_seqs_per_request,
                                max_waiting_seqs=args.max_waiting_seqs, body_timeout_s=args.body_timeout)
    with _listen(args.host, args.port) as sock:
        llm, model_name = _load_llm(args)
        with llm:
            app = build_app(llm, model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                            limits=admission, chat_template=chat_template)
            port = sock.getsockname()[1]
            url_host = f"[{args.host}]" if ":" in args.host else args.host
            limits = ", ".join(f"{k} {v}" for k, v in llm.limits.items())
            print(f"rtllm serve: {model_name!r} ({limits}) at http://{url_host}:{port}/v1", flush=True)
            if args.api_key is None and not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:
                print(f"rtllm serve: warning: listening on {args.host} without --api-key: anyone who "
                      "can reach this port can use the model", file=sys.stderr)
            # On Ctrl+C or SIGTERM, requests still running after --drain-timeout are aborted: their
            # streams end with a final chunk.
            server = make_server(app, conn_limits, host=args.host, port=port, log_level=args.log_level)
            _run_until_signal(server, sock)


def _run_until_signal(server, sock: socket.socket) -> None:
    """Runs uvicorn until Ctrl+C or SIGTERM. Uvicorn shuts down gracefully, then raises the signal
    again; as KeyboardInterrupt (SIGTERM included) it ends here, so the engine shuts down cleanly
    rather than the process dying."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
