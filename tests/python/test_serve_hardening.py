"""`rtllm serve` (the demo model, on 127.0.0.1) against hostile clients: idle and trickling
connections are closed, running out of file descriptors is logged once per interval, huge prompts
are refused without freezing other streams, one request's fan-out is bounded and cannot starve a
small request, and SIGTERM ends open streams with a final chunk and [DONE]."""
import asyncio
import contextlib
import json
import resource
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from serve_process import free_port, stop, wait_until_healthy

TIMEOUT_S = 60


@contextlib.contextmanager
def rtllm_serve(tmp_path, *flags, preexec_fn=None):
    """Runs `rtllm serve` (the demo model) with `flags`; yields (base URL, process, log path)."""
    port = free_port()
    log_path = tmp_path / f"serve-{port}.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "rtllm.cli", "serve", "--port", str(port),
                                    "--log-level", "warning", *flags],
                                   stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_path, TIMEOUT_S)
        yield url, process, log_path
    finally:
        stop(process, TIMEOUT_S)


def connect(url) -> socket.socket:
    port = int(url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Sends `trickle` a byte every 0.2 s until the server closes the connection; returns when it
    did (seconds), or fails after `seconds`. A response before the close (a 408) is fine."""
    start = time.monotonic()
    sock.settimeout(0.2)
    i = 0
    while time.monotonic() - start < seconds:
        try:
            if i < len(trickle):
                sock.sendall(trickle[i:i + 1])
                i += 1
            data = sock.recv(65536)
            if data == b"" or b"408" in data.split(b"\r\n", 1)[0]:
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    raise AssertionError(f"the server kept the connection open for {seconds} s")


def test_idle_and_trickling_connections_are_closed(tmp_path):
    with rtllm_serve(tmp_path, "--header-timeout", "1", "--body-timeout", "1", "--keep-alive-timeout", "1") \
            as (url, _, _):
        idle = connect(url)
        head = connect(url)
        body = connect(url)
        body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        kept_alive, kept_trickling = connect(url), connect(url)
        for s in (kept_alive, kept_trickling):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" in s.recv(65536)
        # A header a byte at a time never completes the head; a body a byte at a time never
        # completes within the body timeout (408); both kept sending while they were closed.
        assert closed_within(idle, 5) < 5
        assert closed_within(head, 5, b"POST /v1/completions HTTP/1.1\r\nX-Slow: " + b"a" * 100) < 5
        assert closed_within(body, 5, b'{"prompt": "' + b"a" * 100) < 5
        assert closed_within(kept_alive, 5) < 5
        assert closed_within(kept_trickling, 5, b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100) < 5
        for s in (idle, head, body, kept_alive, kept_trickling):
            s.close()
        assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_out_of_file_descriptors_is_logged_once_per_interval(tmp_path):
    def few_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

    with rtllm_serve(tmp_path, "--max-connections", "100000", preexec_fn=few_files) as (url, _, log_path):
        sockets = []
        try:
            for _ in range(300):  # past the server's 128 descriptors
                sockets.append(connect(url))
            time.sleep(3.5)  # asyncio retries accepting every second
        finally:
            for s in sockets:
                s.close()
        time.sleep(1.5)
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    log = log_path.read_text()  # the server has stopped (a retry may come after)
    assert "Traceback" not in log, log[-3000:]
    assert log.count("out of file descriptors") == 1, log[-3000:]


def test_a_connection_limit_closes_connections_past_it(tmp_path):
    with rtllm_serve(tmp_path, "--max-connections", "5") as (url, _, _):
        held = [connect(url) for _ in range(5)]
        time.sleep(0.5)
        extra = connect(url)  # accepted, then closed at once
        assert closed_within(extra, 3) < 3
        for s in held:
            s.close()
        time.sleep(0.5)
        assert httpx.get(url + "/health", timeout=5).status_code == 200


async def stream_gaps(client, url, body) -> list:
    """The seconds between consecutive events of one streamed completion (from the request on)."""
    gaps, last = [], time.monotonic()
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                now = time.monotonic()
                gaps.append(now - last)
                last = now
    return gaps


def test_huge_prompts_are_refused_without_freezing_other_streams(tmp_path):
    huge = "hello world " * 90_000  # ~1 MB, far past max_input_len x 64 characters
    with rtllm_serve(tmp_path, "--max-body-bytes", str(4 << 20), "--max-batch-size", "4") as (url, _, _):
        async def run():
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                async def abuse():
                    for _ in range(2):
                        responses = await asyncio.gather(*[
                            client.post(url + "/v1/completions", json={"prompt": huge, "max_tokens": 4})
                            for _ in range(6)])
                        for response in responses:
                            assert response.status_code == 400, response.text
                            assert "characters" in response.json()["error"]["message"]
                    messages = [{"role": "user", "content": huge}]
                    response = await client.post(url + "/v1/chat/completions", json={"messages": messages})
                    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"

                abuser = asyncio.ensure_future(abuse())
                gaps = []
                body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
                while not abuser.done() or not gaps:
                    gaps += await stream_gaps(client, url, body)
                await abuser
                return gaps

        gaps = asyncio.run(run())
        assert max(gaps) < 1.0, f"a stream stalled for {max(gaps):.2f} s"


def test_fan_out_is_bounded_and_cannot_starve_a_small_request(tmp_path):
    with rtllm_serve(tmp_path, "--max-batch-size", "4", "--max-waiting-seqs", "300") as (url, _, _):
        # 128 prompts x n=128 = 16,384 sequences: refused, naming the limit and its flag.
        many = {"prompt": ["hi"] * 128, "n": 128, "max_tokens": 4}
        response = httpx.post(url + "/v1/completions", json=many, timeout=TIMEOUT_S)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "n" and "256" in error["message"] and "--max-seqs-per-request" in error["message"]

        async def run():
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                fan_out = {"prompt": ["Once upon a time", "The sea"], "n": 128, "max_tokens": 100,
                           "temperature": 1.0, "ignore_eos": True}
                start = time.monotonic()
                big = asyncio.ensure_future(client.post(url + "/v1/completions", json=fan_out))
                await asyncio.sleep(0.5)  # the fan-out's 256 sequences are queued
                # A second fan-out would take the waiting queue past --max-waiting-seqs: 429.
                second = await client.post(url + "/v1/completions", json=fan_out)
                assert second.status_code == 429, second.text
                assert "--max-waiting-seqs" in second.json()["error"]["message"]
                small_start = time.monotonic()
                small = await client.post(url + "/v1/completions",
                                          json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
                small_s = time.monotonic() - small_start
                assert small.status_code == 200 and small.json()["usage"]["completion_tokens"] == 3
                big_done_first = big.done()
                response = await big
                assert response.status_code == 200 and len(response.json()["choices"]) == 256
                return small_s, time.monotonic() - start, big_done_first

        small_s, big_s, big_done_first = asyncio.run(run())
        # In arrival order the small request waits for 256 sequences / 4 slots x 100 tokens.
        assert not big_done_first and small_s < big_s / 5, (small_s, big_s)


def test_sigterm_ends_open_streams_with_a_final_chunk(tmp_path):
    with rtllm_serve(tmp_path, "--max-batch-size", "2", "--drain-timeout", "1") as (url, process, log_path):
        async def stream(client, results):
            events = []
            body = {"prompt": "Once upon a time", "max_tokens": 480, "temperature": 0, "ignore_eos": True,
                    "stream": True, "n": 4}
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
            results.append(events)

        async def run():
            results = []
            async with httpx.AsyncClient(timeout=TIMEOUT_S) as client:
                tasks = [asyncio.ensure_future(stream(client, results)) for _ in range(8)]
                await asyncio.sleep(1.0)  # all have started; some wait for a slot
                started = time.monotonic()
                process.send_signal(signal.SIGTERM)
                await asyncio.gather(*tasks)
                return results, time.monotonic() - started

        results, drain_s = asyncio.run(run())
        assert process.wait(timeout=TIMEOUT_S) == 0
        assert drain_s < 1 + 5, drain_s
        reasons = []
        for events in results:
            assert events[-1] == "[DONE]", events[-3:]
            finish = {}
            for event in events[:-1]:
                for choice in json.loads(event)["choices"]:
                    if choice["finish_reason"] is not None:
                        finish[choice["index"]] = choice["finish_reason"]
            assert sorted(finish) == [0, 1, 2, 3], events[-3:]
            reasons += finish.values()
        assert "abort" in reasons  # the drain ended some
        log = log_path.read_text()
        assert "Traceback" not in log and "Error" not in log, log[-3000:]


@pytest.mark.parametrize("flag, value, fragment", [
    ("--header-timeout", "0", "--header-timeout=0 must be > 0"),
    ("--body-timeout", "-1", "--body-timeout=-1 must be > 0"),
    ("--drain-timeout", "nan", "--drain-timeout=nan must be > 0"),
    ("--max-connections", "0", "--max-connections=0 must be >= 1"),
    ("--max-seqs-per-request", "0", "--max-seqs-per-request=0 must be >= 1"),
    ("--max-waiting-seqs", "-5", "--max-waiting-seqs=-5 must be >= 1"),
])
def test_limit_flags_are_checked_before_loading(flag, value, fragment):
    result = subprocess.run([sys.executable, "-m", "rtllm.cli", "serve", "--port", str(free_port()), flag, value],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode != 0 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
