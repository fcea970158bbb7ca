"""rtllm bench: request and token throughput, TTFT, TPOT, ITL and end-to-end latency of a model
(through the LLM API) or of a running server (through its OpenAI-compatible API)."""
from rtllm.bench.cli import add_bench_parser

__all__ = ["add_bench_parser"]
