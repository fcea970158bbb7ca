"""Soak test of `rtllm serve` on 127.0.0.1 with the CPU demo model: N requests mixing plain and
streamed completions, n > 1, cancels, disconnects, oversized and invalid requests, while K idle or
trickling connections are held open and a well-behaved client streams without pause. It checks:

- every valid request is answered correctly: greedy outputs equal LLM.generate's for the prompt;
- every invalid or oversized request is refused with a 4xx;
- no KV block is left in use once all requests have ended (the server's /metrics);
- the server's RSS after N requests is within 10% of its RSS after N/10 (both counted after a
  warm-up of --warmup requests, checked alike);
- the well-behaved client never waits more than 1 s between two events of its stream.

  python benchmarks/soak_serve.py                      # 10,000 requests, 500 idle connections
  python benchmarks/soak_serve.py --requests 300 --idle 50

Prints a report (and --json PATH writes it); exits 1 if any check fails.
"""
import argparse
import asyncio
import collections
import json
import os
import random
import resource
import socket
import subprocess
import sys
import time

import httpx

PROMPTS = ["Once upon a time", "The sea was", "Hello", "In the morning the little", "She said that",
           "The cat and the dog", "One day, a", "Tom wanted to", "It was a sunny", "The end of the"]
MAX_TOKENS = (1, 4, 12, 24)
MAX_GAP_S = 1.0
RSS_TOLERANCE = 0.10
KINDS = ("plain", "stream", "n", "stream_n", "cancel", "disconnect", "oversized", "invalid")
WEIGHTS = (35, 20, 8, 7, 8, 7, 7, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def invalid_bodies(max_input_len: int, max_body_bytes: int):
    """(name, raw body bytes) of requests the server must refuse with a 4xx."""
    def j(body):
        return json.dumps(body).encode()
    return [
        ("bad json", b"{not json"),
        ("negative temperature", j({"prompt": "hi", "temperature": -1})),
        ("unknown model", j({"prompt": "hi", "model": "no-such-model"})),
        ("no prompt", j({"max_tokens": 3})),
        ("n too large", j({"prompt": "hi", "n": 100000})),
        ("token id outside the vocabulary", j({"prompt": [1 << 30], "max_tokens": 2})),
        ("max_tokens past max_seq_len", j({"prompt": "hi", "max_tokens": 1 << 20})),
        ("array of objects", j([{"prompt": "hi"}])),
    ], [
        ("prompt past max_input_len characters", j({"prompt": "ab " * (max_input_len * 30), "max_tokens": 2})),
        ("prompts x n past the per-request limit", j({"prompt": ["hi"] * 128, "n": 4, "max_tokens": 2})),
        ("body past --max-body-bytes", j({"prompt": "x" * (max_body_bytes + 10)})),
    ]


class Soak:
    def __init__(self, args, url: str, pid: int, references: dict, max_input_len: int):
        self.args = args
        self.url = url
        self.pid = pid
        self.references = references
        self.rng = random.Random(args.seed)
        self.invalid, self.oversized = invalid_bodies(max_input_len, args.max_body_bytes)
        self.counts = collections.Counter()
        self.failures: list = []
        self.num_done = 0
        self.rss_at_tenth = None
        self.max_gap_s = 0.0
        self.num_monitor_streams = 0
        self.idle_reopened = 0
        self.stop = asyncio.Event()

    def client(self) -> httpx.AsyncClient:
        # Kept-alive connections are dropped well before the server's keep-alive timeout (5 s), so
        # a request never races the server closing its connection.
        return httpx.AsyncClient(timeout=self.args.timeout, limits=httpx.Limits(keepalive_expiry=1.0))

    def fail(self, what: str) -> None:
        self.counts["failed"] += 1
        if len(self.failures) < 50:
            self.failures.append(what)

    # One request of each kind.

    def valid_body(self, n: int, stream: bool):
        prompt = self.rng.choice(PROMPTS)
        max_tokens = self.rng.choice(MAX_TOKENS)
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "n": n,
                "stream": stream}
        return body, self.references[(prompt, max_tokens)]

    async def check_plain(self, client, n: int) -> None:
        body, expected = self.valid_body(n, False)
        response = await client.post(self.url + "/v1/completions", json=body)
        if response.status_code != 200:
            return self.fail(f"valid request {body} got {response.status_code}: {response.text[:200]}")
        choices = response.json()["choices"]
        texts = [c["text"] for c in sorted(choices, key=lambda c: c["index"])]
        if texts != [expected] * n or any(c["finish_reason"] != "length" for c in choices):
            self.fail(f"{body}: got {texts}, LLM.generate gives {expected!r}")

    async def check_stream(self, client, n: int) -> None:
        body, expected = self.valid_body(n, True)
        texts, finish = collections.defaultdict(str), {}
        done = False
        async with client.stream("POST", self.url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return self.fail(f"valid stream {body} got {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] += choice["text"]
                    if choice["finish_reason"] is not None:
                        finish[choice["index"]] = choice["finish_reason"]
        if not done or [texts[i] for i in range(n)] != [expected] * n or finish != {i: "length" for i in range(n)}:
            self.fail(f"stream {body}: got {dict(texts)} {finish} done={done}, LLM.generate gives {expected!r}")

    async def cancel(self, client) -> None:
        body, _ = self.valid_body(self.rng.choice((1, 2)), False)
        body["max_tokens"] = 200
        task = asyncio.ensure_future(client.post(self.url + "/v1/completions", json=body))
        await asyncio.sleep(self.rng.uniform(0.0, 0.05))
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, httpx.HTTPError):
            pass

    async def disconnect(self) -> None:
        body, _ = self.valid_body(self.rng.choice((1, 3)), True)
        body["max_tokens"] = 200
        async with self.client() as own:  # its own connection, dropped
            async with own.stream("POST", self.url + "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    return self.fail(f"stream to drop got {response.status_code}")
                num_events = self.rng.randint(1, 3)
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        num_events -= 1
                        if num_events == 0:
                            break

    async def refused(self, client, name: str, raw: bytes) -> None:
        response = await client.post(self.url + "/v1/completions", content=raw,
                                     headers={"Content-Type": "application/json"})
        if not 400 <= response.status_code < 500 or response.status_code == 429:
            self.fail(f"{name}: expected a 4xx refusal, got {response.status_code}: {response.text[:200]}")

    async def one(self, client, kind: str) -> None:
        if kind == "plain":
            await self.check_plain(client, 1)
        elif kind == "stream":
            await self.check_stream(client, 1)
        elif kind == "n":
            await self.check_plain(client, self.rng.randint(2, 4))
        elif kind == "stream_n":
            await self.check_stream(client, self.rng.randint(2, 4))
        elif kind == "cancel":
            await self.cancel(client)
        elif kind == "disconnect":
            await self.disconnect()
        elif kind == "oversized":
            await self.refused(client, *self.rng.choice(self.oversized))
        else:
            await self.refused(client, *self.rng.choice(self.invalid))

    # The load, the idle connections and the well-behaved client.

    async def worker(self, queue: asyncio.Queue) -> None:
        async with self.client() as client:
            while True:
                try:
                    kind = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                try:
                    await self.one(client, kind)
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self.fail(f"{kind}: {type(e).__name__}: {e}")
                self.num_done += 1
                if self.num_done <= self.args.warmup:
                    continue
                self.counts[kind] += 1
                if self.num_done == self.args.warmup + max(1, self.args.requests // 10):
                    self.rss_at_tenth = rss_bytes(self.pid)

    async def idle_connection(self, index: int) -> None:
        """Holds a connection that sends nothing (even index) or a header a byte a second (odd);
        reopens it whenever the server closes it."""
        port = int(self.url.rsplit(":", 1)[1])
        trickle = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 10_000
        while not self.stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(1)
                continue
            try:
                i = 0
                while not self.stop.is_set():
                    if index % 2:
                        writer.write(trickle[i:i + 1])
                        i += 1
                    try:
                        if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                            self.idle_reopened += 1  # closed by the server
                            break
                    except asyncio.TimeoutError:
                        pass
            except OSError:
                pass
            finally:
                writer.close()

    async def monitor(self) -> None:
        """A well-behaved client streaming one completion after another; the longest pause between
        two events of a stream is the number to watch."""
        body = {"prompt": "Once upon a time", "max_tokens": 48, "temperature": 0, "ignore_eos": True,
                "stream": True}
        async with self.client() as client:
            while not self.stop.is_set():
                last = None
                async with client.stream("POST", self.url + "/v1/completions", json=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            now = time.monotonic()
                            if last is not None:
                                self.max_gap_s = max(self.max_gap_s, now - last)
                            last = now
                self.num_monitor_streams += 1

    async def run(self) -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for kind in self.rng.choices(KINDS, WEIGHTS, k=self.args.warmup + self.args.requests):
            queue.put_nowait(kind)
        background = [asyncio.ensure_future(self.idle_connection(i)) for i in range(self.args.idle)]
        await asyncio.sleep(min(2.0, 0.01 * self.args.idle))  # the idle connections are open
        background.append(asyncio.ensure_future(self.monitor()))
        start = time.monotonic()
        await asyncio.gather(*[self.worker(queue) for _ in range(self.args.concurrency)])
        elapsed = time.monotonic() - start
        self.stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        return elapsed


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def references(args) -> tuple:
    """LLM.generate's greedy text for every (prompt, max_tokens) the soak sends, and max_input_len."""
    from rtllm import LLM, SamplingParams
    from rtllm.default_model import default_model_dir

    with LLM(default_model_dir(), max_batch_size=args.max_batch_size) as llm:
        out = {}
        for max_tokens in MAX_TOKENS:
            params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens)
            for prompt, output in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
                out[(prompt, max_tokens)] = output.outputs[0].text
        return out, llm.max_input_len


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=10_000, help="requests to send (default 10,000)")
    p.add_argument("--idle", type=int, default=500, help="idle or trickling connections held (default 500)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    p.add_argument("--warmup", type=int, default=200,
                   help="requests before the N, checked alike, that warm the server's memory (default 200)")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--header-timeout", type=float, default=30.0, help="the server's --header-timeout")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for a response")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    args = p.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # the idle connections need descriptors
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    refs, max_input_len = references(args)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "rtllm.cli", "serve", "--port", str(port),
                               "--max-batch-size", str(args.max_batch_size), "--max-body-bytes",
                               str(args.max_body_bytes), "--header-timeout", str(args.header_timeout),
                               "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rtllm serve did not start:\n{server.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        soak = Soak(args, url, server.pid, refs, max_input_len)
        elapsed = asyncio.run(soak.run())
        rss_end = rss_bytes(server.pid)
        # Everything has ended (cancels and disconnects abort their requests): nothing may hold blocks.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            busy = metric(url, "rtllm:num_requests_running") + metric(url, "rtllm:num_requests_waiting")
            kv_usage = metric(url, "rtllm:kv_cache_usage_ratio")
            if busy == 0 and kv_usage == 0:
                break
            time.sleep(0.2)
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        server.terminate()
        try:
            log, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            log, _ = server.communicate()

    rss_growth = rss_end / soak.rss_at_tenth - 1 if soak.rss_at_tenth else float("nan")
    checks = {
        "every valid request answered correctly, every invalid one refused with a 4xx": soak.counts["failed"] == 0,
        "zero KV blocks in use and nothing running at the end": busy == 0 and kv_usage == 0,
        f"RSS after {args.requests} within {RSS_TOLERANCE:.0%} of RSS after {args.requests // 10}":
            abs(rss_growth) <= RSS_TOLERANCE,
        f"no stream gap over {MAX_GAP_S:g} s for the well-behaved client": soak.max_gap_s <= MAX_GAP_S
                                                                             and soak.num_monitor_streams > 0,
        "the server still healthy": healthy,
        # Idle and trickling connections outlive the header timeout only if the server fails to close them.
        "idle connections closed by the server": elapsed < args.header_timeout + 2 or soak.idle_reopened > 0,
        "no traceback in the server log": "Traceback" not in log,
    }
    report = {
        "requests": args.requests, "idle_connections": args.idle, "concurrency": args.concurrency,
        "elapsed_s": round(elapsed, 2), "requests_per_s": round(args.requests / elapsed, 1),
        "by_kind": {k: soak.counts[k] for k in KINDS}, "failed": soak.counts["failed"],
        "rss_at_tenth_mb": round((soak.rss_at_tenth or 0) / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth": round(rss_growth, 4), "max_stream_gap_s": round(soak.max_gap_s, 3),
        "monitor_streams": soak.num_monitor_streams, "idle_connections_closed_by_server": soak.idle_reopened,
        "kv_cache_usage_end": kv_usage, "checks": checks, "failures": soak.failures[:20],
    }
    print(json.dumps(report, indent=2))
    if "Traceback" in log:
        print(log[-4000:], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    ok = all(checks.values())
    print(f"soak: {'PASS' if ok else 'FAIL'}" + "".join(f"\n  [{'ok' if v else 'FAILED'}] {k}"
                                                       for k, v in checks.items()))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
