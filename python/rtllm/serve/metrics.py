"""Prometheus metrics of the server, written in the text exposition format (no extra dependency).

Counters and histograms change only on the event loop's thread, so they need no lock. Gauges
(running / waiting requests, KV cache usage) are read from the engine's stats at scrape time.
Outcomes count generated sequences: a request with n choices counts n.
"""
from __future__ import annotations

import time
from typing import Optional

OUTCOMES = ("stop", "length", "abort", "error")
_OUTCOME_OF_FINISH_REASON = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _header(name: str, kind: str, help_text: str) -> list:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple):
        self.name, self.help_text, self.buckets = name, help_text, buckets
        self.bucket_counts = [0] * len(buckets)  # not cumulative; render() sums them
        self.count, self.sum = 0, 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.bucket_counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def render(self) -> list:
        lines, cumulative = _header(self.name, "histogram", self.help_text), 0
        for bound, count in zip(self.buckets, self.bucket_counts):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}', f"{self.name}_sum {self.sum}",
                  f"{self.name}_count {self.count}"]
        return lines


class ServerMetrics:
    """Totals since the server started."""

    def __init__(self):
        self.num_sequences = dict.fromkeys(OUTCOMES, 0)
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.ttft = Histogram("rtllm:time_to_first_token_seconds",
                              "Seconds from a prompt's arrival to its first generated token.",
                              TTFT_BUCKETS)
        self.tpot = Histogram("rtllm:time_per_output_token_seconds",
                              "Seconds per generated token after the first, per sequence.", TPOT_BUCKETS)
        self.e2e = Histogram("rtllm:e2e_request_latency_seconds",
                             "Seconds from a request's arrival to its last token (requests that "
                             "finished with stop or length).", E2E_BUCKETS)

    def start_request(self, num_prompt_tokens: list, n: int) -> "RequestRecord":
        return RequestRecord(self, num_prompt_tokens, n)

    def render(self, engine_stats: dict) -> str:
        kv = engine_stats["kv_cache"]
        num_running = engine_stats["num_active_requests"] - engine_stats["num_waiting_requests"]
        kv_usage = kv["num_used_blocks"] / kv["num_total_blocks"] if kv["num_total_blocks"] else 0.0
        lines = _header("rtllm:requests_total", "counter",
                        "Generated sequences by how they ended (a request with n choices counts n).")
        lines += [f'rtllm:requests_total{{outcome="{o}"}} {self.num_sequences[o]}' for o in OUTCOMES]
        for name, value, help_text in (
                ("rtllm:prompt_tokens_total", self.num_prompt_tokens, "Prompt tokens of finished requests."),
                ("rtllm:generation_tokens_total", self.num_generation_tokens,
                 "Tokens generated for finished requests.")):
            lines += _header(name, "counter", help_text) + [f"{name} {value}"]
        for histogram in (self.ttft, self.tpot, self.e2e):
            lines += histogram.render()
        for name, value, help_text in (
                ("rtllm:num_requests_running", num_running, "Sequences the engine is running."),
                ("rtllm:num_requests_waiting", engine_stats["num_waiting_requests"],
                 "Sequences waiting for the engine to admit them."),
                ("rtllm:kv_cache_usage_ratio", kv_usage,
                 "Fraction of KV cache blocks in use (reusable cached blocks count as free).")):
            lines += _header(name, "gauge", help_text) + [f"{name} {value}"]
        return "\n".join(lines) + "\n"


class RequestRecord:
    """Timings of one HTTP request (one RequestOutput stream per prompt), counted when it ends."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: list, n: int):
        self._metrics = metrics
        self._num_prompt_tokens = num_prompt_tokens
        self._n = n
        self._arrival = time.monotonic()
        self._latest: list = [None] * len(num_prompt_tokens)  # each prompt's latest RequestOutput
        self._first_token_time: dict = {}  # (prompt index, sequence index) -> time
        self._finish_time: dict = {}

    def observe(self, prompt_index: int, output) -> None:
        now = time.monotonic()
        self._latest[prompt_index] = output
        for sequence in output.outputs:
            key = (prompt_index, sequence.index)
            if sequence.token_ids and key not in self._first_token_time:
                self._first_token_time[key] = now
            if sequence.finish_reason is not None and key not in self._finish_time:
                self._finish_time[key] = now

    def finish(self, failed: bool) -> None:
        """Counts the request; sequences that did not end are "error" if `failed`, else "abort"."""
        metrics = self._metrics
        unfinished = "error" if failed else "abort"
        all_completed = True
        for prompt_index, output in enumerate(self._latest):
            sequences = output.outputs if output is not None else [None] * self._n
            for sequence in sequences:
                reason = sequence.finish_reason if sequence is not None else None
                outcome = _OUTCOME_OF_FINISH_REASON.get(reason, unfinished)
                metrics.num_sequences[outcome] += 1
                all_completed &= outcome in ("stop", "length")
                if sequence is not None:
                    metrics.num_generation_tokens += len(sequence.token_ids)
                    self._observe_tpot(prompt_index, sequence)
            first_times = [t for (p, _), t in self._first_token_time.items() if p == prompt_index]
            if first_times:
                metrics.ttft.observe(min(first_times) - self._arrival)
        metrics.num_prompt_tokens += sum(self._num_prompt_tokens)
        if all_completed:
            metrics.e2e.observe(time.monotonic() - self._arrival)

    def _observe_tpot(self, prompt_index: int, sequence) -> None:
        key = (prompt_index, sequence.index)
        first: Optional[float] = self._first_token_time.get(key)
        end: Optional[float] = self._finish_time.get(key)
        if first is not None and end is not None and len(sequence.token_ids) > 1:
            self._metrics.tpot.observe((end - first) / (len(sequence.token_ids) - 1))
