"""`rtllm bench serve`: the workload sent to a running OpenAI-compatible server, each request a
streamed POST /v1/completions timed chunk by chunk; token counts come from the stream's usage."""
from __future__ import annotations

import json
from typing import Optional

import httpx

from rtllm.bench.dataset import BenchRequest
from rtllm.bench.metrics import RequestRecord
from rtllm.bench.runner import Send, now


def make_client(base_url: str, api_key: Optional[str], timeout_s: float) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # No pool limit: the benchmark's own concurrency limit decides how many requests are in flight,
    # and a request must not wait for a connection after its clock started.
    return httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))


def _error_message(status: int, body: bytes) -> str:
    try:
        return f"HTTP {status}: {json.loads(body)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode(errors='replace')}"


async def served_models(client: httpx.AsyncClient) -> list:
    """The entries of GET /v1/models."""
    try:
        response = await client.get("/v1/models")
    except httpx.HTTPError as e:
        raise OSError(f"cannot reach {client.base_url}: {e}") from None
    if response.status_code != 200:
        raise ValueError(f"GET {client.base_url}/v1/models failed: "
                         f"{_error_message(response.status_code, response.content)}")
    return response.json()["data"]


async def _read_stream(response: httpx.Response, record: RequestRecord) -> None:
    usage = None
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue  # blank separators, SSE comments
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
            return
        # rtllm serve sends a chunk only when a choice has new output: text, or its finish_reason
        # with the last tokens. Each counts as one delivery; the total comes from usage below.
        if chunk.get("choices"):
            record.deliver(now(), 1)
        usage = chunk.get("usage") or usage
    else:
        record.error = "the stream ended without [DONE]"
        return
    if usage is None:
        record.error = "the stream carried no usage (the server ignored stream_options.include_usage)"
        return
    # The server's counts are authoritative: a chunk may hold several tokens.
    record.num_prompt_tokens = usage["prompt_tokens"]
    record.num_output_tokens = usage["completion_tokens"]


def server_sender(client: httpx.AsyncClient, model: str, sampling: dict) -> Send:
    """A `send` that streams one request from the server and records its chunks' arrivals."""

    async def send(request: BenchRequest) -> RequestRecord:
        # Token ids go as they are (OpenAI's completions API takes a list of ints as a prompt), so
        # the server sees the same prompt the in-process modes do.
        prompt = request.prompt_token_ids if request.prompt_token_ids is not None else request.prompt
        body = {"model": model, "prompt": prompt, "max_tokens": request.output_len, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": True, **sampling}
        record = RequestRecord(sent=now())
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    record.error = _error_message(response.status_code, await response.aread())
                else:
                    await _read_stream(response, record)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:  # connection lost, malformed chunks
            record.error = f"{type(e).__name__}: {e}"
        record.ended = now()
        return record

    return send
