"""Sends a workload at a request rate and a concurrency limit, one coroutine per request, and
records what each request's client saw. Every mode shares it; only `send` differs (the LLM API in
process, or HTTP to a server)."""
from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import Awaitable, Callable, Optional

import numpy as np
from tqdm import tqdm

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import RequestRecord

Send = Callable[[BenchRequest], Awaitable[RequestRecord]]


def now() -> float:
    return time.perf_counter()


def send_offsets(num_requests: int, request_rate: float, seed: int = 0) -> np.ndarray:
    """When each request is sent, in seconds after the first: a Poisson process of `request_rate`
    requests/s (exponential gaps), or all at once for an infinite rate."""
    if not request_rate > 0:
        raise ValueError(f"request_rate={request_rate!r} must be > 0 (inf sends all at once)")
    if math.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


async def run_requests(send: Send, requests: list, request_rate: float = math.inf,
                       max_concurrency: Optional[int] = None, seed: int = 0,
                       progress: bool = True) -> tuple:
    """Runs every request; returns (records in request order, seconds from start to the last end)."""
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency={max_concurrency!r} must be >= 1")
    offsets = send_offsets(len(requests), request_rate, seed)
    # Arrivals beyond the concurrency limit queue here; their TTFT counts from when they are sent.
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(requests), desc="requests", unit="req", disable=not progress, leave=False)

    async def one(request: BenchRequest) -> RequestRecord:
        async with limit:
            record = await send(request)
        bar.update(1)
        return record

    start = now()
    tasks = []
    try:
        for request, offset in zip(requests, offsets):
            delay = start + offset - now()
            if delay > 0:  # sleep to an absolute schedule so the rate does not drift
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(request)))
        records = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return list(records), now() - start


async def warm_up(send: Send, requests: list, num_warmup: int) -> None:
    """Sends the first `num_warmup` requests one at a time, untimed; raises if one fails (a
    workload whose requests fail is not worth timing)."""
    for request in requests[:num_warmup]:
        record = await send(request)
        if record.error is not None:
            raise ValueError(f"warm-up request failed: {record.error}")
