"""Benchmark workloads: random token-id prompts, or a JSONL file of prompts and output lengths."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class BenchRequest:
    """One request of a workload: a text prompt or token ids, and how many tokens to generate
    (requests are sent with ignore_eos, so each produces exactly `output_len` tokens)."""

    output_len: int
    prompt: Optional[str] = None
    prompt_token_ids: Optional[list] = None

    @property
    def llm_input(self):
        """The prompt as the LLM API takes it."""
        if self.prompt_token_ids is not None:
            return {"prompt_token_ids": self.prompt_token_ids}
        return self.prompt


def length_range(mean: int, range_ratio: float) -> tuple:
    """The inclusive [low, high] range of lengths drawn uniformly around `mean` (never below 1)."""
    return max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))


def random_requests(num_requests: int, input_len: int, output_len: int, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0) -> list:
    """`num_requests` prompts of uniformly random token ids; prompt and output lengths are drawn
    uniformly from length_range(input_len / output_len, range_ratio). Same seed, same workload."""
    for name, value in (("num_requests", num_requests), ("input_len", input_len),
                        ("output_len", output_len), ("vocab_size", vocab_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio={range_ratio!r} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    in_low, in_high = length_range(input_len, range_ratio)
    out_low, out_high = length_range(output_len, range_ratio)
    input_lens = rng.integers(in_low, in_high + 1, size=num_requests)
    output_lens = rng.integers(out_low, out_high + 1, size=num_requests)
    return [BenchRequest(output_len=int(n_out), prompt_token_ids=rng.integers(0, vocab_size, size=n_in).tolist())
            for n_in, n_out in zip(input_lens, output_lens)]


def _parse_line(entry, where: str) -> BenchRequest:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    output_len = entry.get("output_tokens")
    if output_len is None:
        raise ValueError(f"{where}: missing field 'output_tokens'")
    if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
        raise ValueError(f"{where}: output_tokens={output_len!r} must be an int >= 1")
    if "input_ids" in entry:
        ids = entry["input_ids"]
        if not isinstance(ids, list) or not ids or \
                not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"{where}: input_ids must be a non-empty list of ints >= 0")
        return BenchRequest(output_len=output_len, prompt_token_ids=ids)
    if "prompt" in entry:
        prompt = entry["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{where}: prompt must be a non-empty string")
        return BenchRequest(output_len=output_len, prompt=prompt)
    raise ValueError(f"{where}: missing field 'prompt' (text) or 'input_ids' (token ids)")


def load_jsonl(path: str, num_requests: Optional[int] = None) -> list:
    """Requests from a JSONL file: one object per line with `prompt` (text) or `input_ids` (token
    ids), and `output_tokens`. Blank lines are skipped; the first `num_requests` are taken (all
    when None). Bad lines raise ValueError naming the file and line number."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if num_requests is not None and len(requests) == num_requests:
                break
            if not line.strip():
                continue
            where = f"{path}, line {line_number}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            requests.append(_parse_line(entry, where))
    if not requests:
        raise ValueError(f"{path} holds no requests")
    if num_requests is not None and len(requests) < num_requests:
        raise ValueError(f"{path} holds {len(requests)} requests; --num-requests asks for {num_requests}")
    return requests
