"""Latency and throughput metrics of a benchmark run, computed one way for every `rtllm bench` mode.

A client sees each request as: the time it was sent, the times output was delivered to it, the
time it ended, and its token counts. A delivery is a streamed output of the LLM API, or an SSE
chunk of the server; each usually holds one token (the server sends a token whose text is an
incomplete UTF-8 character with the next one). From those:

  TTFT  first delivery - sent
  TPOT  (last delivery - first delivery) / (output tokens - 1): time per output token after the first
  ITL   gaps between successive deliveries (several tokens delivered together count as one gap)
  E2E   ended - sent
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2e")
_LABELS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds, from one monotonic clock)."""

    sent: float
    ended: Optional[float] = None
    delivery_times: list = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: Optional[str] = None

    def deliver(self, time: float, num_tokens: int) -> None:
        """Output holding `num_tokens` tokens reached the client at `time`."""
        if num_tokens > 0:
            self.delivery_times.append(time)
            self.num_output_tokens += num_tokens

    @property
    def ok(self) -> bool:
        return self.error is None and self.ended is not None and bool(self.delivery_times)

    def ttft(self) -> float:
        return self.delivery_times[0] - self.sent

    def tpot(self) -> Optional[float]:
        if self.num_output_tokens < 2:
            return None
        return (self.delivery_times[-1] - self.delivery_times[0]) / (self.num_output_tokens - 1)

    def itls(self) -> list:
        return np.diff(self.delivery_times).tolist()

    def e2e(self) -> float:
        return self.ended - self.sent


def summarize(values_s) -> dict:
    """mean/p50/p90/p99 in milliseconds of durations in seconds (linear-interpolated percentiles);
    an empty dict for no values."""
    v = np.asarray(values_s, dtype=np.float64) * 1e3
    if v.size == 0:
        return {}
    return {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)),
            "p90_ms": float(np.percentile(v, 90)), "p99_ms": float(np.percentile(v, 99))}


def compute_metrics(records: list, duration_s: float) -> dict:
    """The report of a run: counts, throughputs over `duration_s` (first send to last end), and a
    summary of each latency metric over the requests that succeeded."""
    done = [r for r in records if r.ok]
    errors = [r.error or "no output" for r in records if not r.ok]
    num_input = sum(r.num_prompt_tokens for r in done)
    num_output = sum(r.num_output_tokens for r in done)
    tpots = [t for t in (r.tpot() for r in done) if t is not None]
    return {
        "num_requests": len(records),
        "num_completed": len(done),
        "num_failed": len(errors),
        "errors": errors[:5],
        "duration_s": duration_s,
        "total_input_tokens": num_input,
        "total_output_tokens": num_output,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_token_throughput": num_output / duration_s if duration_s > 0 else 0.0,
        "total_token_throughput": (num_input + num_output) / duration_s if duration_s > 0 else 0.0,
        "ttft": summarize([r.ttft() for r in done]),
        "tpot": summarize(tpots),
        "itl": summarize([gap for r in done for gap in r.itls()]),
        "e2e": summarize([r.e2e() for r in done]),
    }


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # two decimals, or three significant digits below 1
        return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def format_table(title: str, metrics: dict) -> str:
    """The report as a plain-text table: totals and throughputs, then latency percentiles in ms."""
    totals = [("Requests completed", metrics["num_completed"]), ("Requests failed", metrics["num_failed"]),
              ("Duration (s)", metrics["duration_s"]),
              ("Input tokens", metrics["total_input_tokens"]), ("Output tokens", metrics["total_output_tokens"]),
              ("Request throughput (req/s)", metrics["request_throughput"]),
              ("Output token throughput (tok/s)", metrics["output_token_throughput"]),
              ("Total token throughput (tok/s)", metrics["total_token_throughput"])]
    width = max(len(label) for label, _ in totals) + 12
    lines = [f" {title} ".center(width, "="),
             *(f"{label}{_fmt(value).rjust(width - len(label))}" for label, value in totals)]
    columns = ("mean_ms", "p50_ms", "p90_ms", "p99_ms")
    rows = [[_LABELS[name] + " (ms)", *(_fmt(metrics[name].get(c)) for c in columns)]
            for name in LATENCY_METRICS]
    header = ["", "mean", "p50", "p90", "p99"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines.append("-" * width)
    for row in [header, *rows]:
        lines.append(row[0].ljust(widths[0]) + "".join(cell.rjust(w + 2) for cell, w in zip(row[1:], widths[1:])))
    lines.append("=" * width)
    for error in metrics["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)
