"""`rtllm bench`: metrics against hand-computed values, workloads, the request driver, and the
command end to end on a tiny model (in process and against the real server)."""
import asyncio
import contextlib
import json
import math
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from rtllm.bench.dataset import BenchRequest, load_jsonl, random_requests
from rtllm.bench.metrics import RequestRecord, compute_metrics, format_table
from rtllm.bench.runner import run_requests, send_offsets

TIMEOUT_S = 120


class ServerProcess:
    """`rtllm serve` in a subprocess on a loopback port."""

    def __init__(self, process, base_url, api_key):
        self.process, self.base_url = process, base_url
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def counters(self) -> dict:
        """Completed requests, prompt and generated tokens, from GET /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base_url}/metrics", headers=self.headers, timeout=10).text
        samples = {(s.name, s.labels.get("outcome")): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        return {"requests": samples[("rtllm:requests_total", "stop")] + samples[("rtllm:requests_total", "length")],
                "prompt_tokens": samples[("rtllm:prompt_tokens_total", None)],
                "generation_tokens": samples[("rtllm:generation_tokens_total", None)]}


@contextlib.contextmanager
def serve_process(model, log_dir, api_key=None, startup_timeout_s=60):
    """Runs the `rtllm serve MODEL` command on a loopback port it picks (--port 0), waits until it
    prints its URL and answers /health, yields a ServerProcess, and stops it on exit. Its output
    goes to log_dir/server.log."""
    args = [sys.executable, "-m", "rtllm.cli", "serve", model, "--host", "127.0.0.1", "--port", "0",
            "--log-level", "warning"]
    if api_key:
        args += ["--api-key", api_key]
    log_path = log_dir / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + startup_timeout_s
        base_url = None
        while True:
            if process.poll() is not None:
                raise AssertionError(f"rtllm serve exited with {process.returncode}:\n{log_path.read_text()}")
            if base_url is None:
                match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log_path.read_text())
                base_url = match and match.group(1)
            if base_url is not None:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                        break
            if time.monotonic() > deadline:
                raise AssertionError(f"rtllm serve was not ready in {startup_timeout_s} s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield ServerProcess(process, base_url, api_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run_bench(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "rtllm.cli", "bench", *args, "--no-progress"],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"rtllm bench {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def record(sent, deliveries, ended, num_prompt_tokens):
    r = RequestRecord(sent=sent, num_prompt_tokens=num_prompt_tokens)
    for time, num_tokens in deliveries:
        r.deliver(time, num_tokens)
    r.ended = ended
    return r


# Metrics.

def test_metrics_match_hand_computed_values():
    records = [
        # 4 tokens, the last two delivered together: TTFT 100, TPOT (250-100)/3 = 50, ITL 50 and 100.
        record(0.0, [(0.1, 1), (0.15, 1), (0.25, 2)], 0.3, 10),
        # 1 token: TTFT 200, no TPOT, no ITL.
        record(1.0, [(1.2, 1)], 1.2, 5),
        # 3 tokens: TTFT 400, TPOT (1300-900)/2 = 200, ITL 100 and 300.
        record(0.5, [(0.9, 1), (1.0, 1), (1.3, 1)], 1.4, 7),
        RequestRecord(sent=0.0, ended=0.1, error="HTTP 400: bad request"),
    ]
    m = compute_metrics(records, duration_s=2.0)
    assert (m["num_requests"], m["num_completed"], m["num_failed"]) == (4, 3, 1)
    assert m["errors"] == ["HTTP 400: bad request"]
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (22, 8)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_token_throughput"] == pytest.approx(4.0)
    assert m["total_token_throughput"] == pytest.approx(15.0)
    # Percentiles interpolate linearly between sorted values: p90 of [100, 200, 400] is 200 + 0.8 * 200.
    expected = {"ttft": (700 / 3, 200, 360, 396), "tpot": (125, 125, 185, 198.5),
                "itl": (137.5, 100, 240, 294), "e2e": (1400 / 3, 300, 780, 888)}
    for name, (mean, p50, p90, p99) in expected.items():
        assert m[name] == pytest.approx({"mean_ms": mean, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99}), name
    table = format_table("test", m)
    assert "Requests failed" in table and "233.33" in table and "198.50" in table and "HTTP 400" in table


def test_a_request_without_output_counts_as_failed():
    m = compute_metrics([record(0.0, [], 0.5, 3), record(0.0, [(0.2, 2)], 0.3, 4)], duration_s=1.0)
    assert (m["num_completed"], m["num_failed"], m["total_output_tokens"]) == (1, 1, 2)
    assert m["tpot"]["mean_ms"] == pytest.approx(0.0)  # two tokens delivered together


# Workloads.

def test_random_lengths_are_uniform_around_the_means_and_deterministic():
    requests = random_requests(2000, input_len=100, output_len=20, vocab_size=50, range_ratio=0.25, seed=7)
    input_lens = np.array([len(r.prompt_token_ids) for r in requests])
    output_lens = np.array([r.output_len for r in requests])
    assert input_lens.min() == 75 and input_lens.max() == 125  # both ends occur in 2000 draws
    assert output_lens.min() == 15 and output_lens.max() == 25
    # Uniform over the 51 input lengths: Pearson's chi-square below its 99.9% quantile at 50 degrees
    # of freedom (86.66); a skewed draw (say, a normal around 100) lands far above it.
    counts = np.bincount(input_lens - 75, minlength=51)
    expected = 2000 / 51
    assert np.sum((counts - expected) ** 2 / expected) < 86.66
    assert all(0 <= t < 50 for r in requests for t in r.prompt_token_ids)
    again = random_requests(2000, input_len=100, output_len=20, vocab_size=50, range_ratio=0.25, seed=7)
    assert again == requests
    other = random_requests(2000, input_len=100, output_len=20, vocab_size=50, range_ratio=0.25, seed=8)
    assert other != requests


def test_random_lengths_are_exact_without_range_ratio():
    requests = random_requests(10, input_len=9, output_len=4, vocab_size=300)
    assert {len(r.prompt_token_ids) for r in requests} == {9} and {r.output_len for r in requests} == {4}


@pytest.mark.parametrize("kwargs,name", [({"input_len": 0}, "input_len"), ({"num_requests": 0}, "num_requests"),
                                         ({"range_ratio": 1.0}, "range_ratio")])
def test_random_rejects_bad_arguments(kwargs, name):
    args = {**dict(num_requests=4, input_len=8, output_len=4, vocab_size=300), **kwargs}
    with pytest.raises(ValueError, match=name):
        random_requests(**args)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_jsonl_holds_text_and_token_prompts(tmp_path):
    path = write_lines(tmp_path / "w.jsonl", ['{"prompt": "Hello", "output_tokens": 3}', "",
                                              '{"input_ids": [5, 6, 7], "output_tokens": 2}'])
    assert load_jsonl(path) == [BenchRequest(output_len=3, prompt="Hello"),
                                BenchRequest(output_len=2, prompt_token_ids=[5, 6, 7])]
    assert load_jsonl(path, num_requests=1) == [BenchRequest(output_len=3, prompt="Hello")]
    with pytest.raises(ValueError, match="holds 2 requests"):
        load_jsonl(path, num_requests=3)


@pytest.mark.parametrize("bad_line,message", [
    ('{"prompt": "Hi"}', "line 2: missing field 'output_tokens'"),
    ('{"output_tokens": 4}', "line 2: missing field 'prompt'"),
    ('{"prompt": "Hi", "output_tokens": 0}', "line 2: output_tokens=0"),
    ('{"input_ids": [], "output_tokens": 4}', "line 2: input_ids must be"),
    ('{"prompt": "Hi", "output_tokens": 4', "line 2: invalid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_jsonl_errors_name_the_line(tmp_path, bad_line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok", "output_tokens": 1}', bad_line])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


# The request driver.

def test_send_offsets():
    assert send_offsets(5, math.inf).tolist() == [0.0] * 5
    offsets = send_offsets(4000, request_rate=50.0, seed=3)
    assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0)
    assert np.mean(np.diff(offsets)) == pytest.approx(1 / 50, rel=0.1)  # exponential gaps of mean 1/rate
    assert np.array_equal(offsets, send_offsets(4000, request_rate=50.0, seed=3))
    with pytest.raises(ValueError, match="request_rate"):
        send_offsets(3, 0.0)


@pytest.mark.parametrize("max_concurrency", [1, 3, None])
def test_run_requests_keeps_order_and_concurrency_limit(max_concurrency):
    in_flight, most = 0, 0

    async def send(request):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001 * (request.output_len % 3))
        in_flight -= 1
        return record(0.0, [(0.1, request.output_len)], 0.2, 1)

    requests = [BenchRequest(output_len=i + 1, prompt="x") for i in range(10)]
    records, duration = asyncio.run(run_requests(send, requests, max_concurrency=max_concurrency, progress=False))
    assert [r.num_output_tokens for r in records] == list(range(1, 11))
    assert most == (max_concurrency or 10) and duration > 0


# The command, in process.

WORKLOAD = ["--num-requests", "6", "--input-len", "24", "--output-len", "10", "--range-ratio", "0.5",
            "--seed", "5"]


def expected_counts(vocab_size=300):
    requests = random_requests(6, input_len=24, output_len=10, vocab_size=vocab_size, range_ratio=0.5, seed=5)
    return sum(len(r.prompt_token_ids) for r in requests), sum(r.output_len for r in requests)


@pytest.mark.parametrize("mode", ["throughput", "latency"])
def test_bench_offline_counts_are_exact(tiny_model, tmp_path, mode):
    report_path = tmp_path / "report.json"
    out = run_bench(mode, str(tiny_model("llama")), *WORKLOAD, "--output-json", str(report_path)).stdout
    report = json.loads(report_path.read_text())
    num_input, num_output = expected_counts()
    assert report["mode"] == mode
    assert (report["num_completed"], report["num_failed"]) == (6, 0)
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (num_input, num_output)
    assert report["output_token_throughput"] == pytest.approx(num_output / report["duration_s"])
    for name in ("ttft", "tpot", "itl", "e2e"):
        assert set(report[name]) == {"mean_ms", "p50_ms", "p90_ms", "p99_ms"}
        assert 0 <= report[name]["p50_ms"] <= report[name]["p99_ms"]
    assert report["ttft"]["mean_ms"] <= report["e2e"]["mean_ms"]
    assert f"rtllm bench {mode}" in out and f"{num_output:,}" in out and "TPOT (ms)" in out


def test_bench_jsonl_text_prompts_count_their_tokens(tiny_model, tmp_path):
    from rtllm.llmapi.tokenizer import TokenizerWrapper

    model = str(tiny_model("llama"))
    prompts = ["Hello world!", "The quick brown fox"]
    path = write_lines(tmp_path / "w.jsonl", [json.dumps({"prompt": p, "output_tokens": 3 + i})
                                              for i, p in enumerate(prompts)])
    report_path = tmp_path / "report.json"
    run_bench("throughput", model, "--dataset", path, "--output-json", str(report_path))
    report = json.loads(report_path.read_text())
    tokenizer = TokenizerWrapper.from_pretrained(model)
    assert report["total_input_tokens"] == sum(len(tokenizer.encode(p)) for p in prompts)
    assert report["total_output_tokens"] == 3 + 4


def test_bench_reports_a_bad_dataset(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "Hi"}'])
    result = run_bench("throughput", str(tmp_path), "--dataset", path, check=False)
    assert result.returncode == 2 and "line 1: missing field 'output_tokens'" in result.stderr


# Against the real server.

def test_bench_serve_agrees_with_the_server_and_with_throughput(tiny_model, tmp_path):
    model = str(tiny_model("llama"))
    with serve_process(model, tmp_path, api_key="bench-key") as server:
        refused = run_bench("serve", "--base-url", server.base_url, "--tokenizer", model, check=False)
        assert refused.returncode == 2 and "HTTP 401" in refused.stderr
        report_path = tmp_path / "serve.json"
        out = run_bench("serve", "--base-url", server.base_url, "--api-key", "bench-key", "--tokenizer", model,
                        *WORKLOAD, "--max-concurrency", "4", "--warmup", "0",
                        "--output-json", str(report_path)).stdout
        served = server.counters()
    report = json.loads(report_path.read_text())
    num_input, num_output = expected_counts()
    assert "rtllm bench serve" in out
    assert (report["num_completed"], report["num_failed"]) == (6, 0)
    assert (report["total_input_tokens"], report["total_output_tokens"]) == (num_input, num_output)
    # The server counted the same requests and tokens.
    assert served == {"requests": 6, "prompt_tokens": num_input, "generation_tokens": num_output}

    offline_path = tmp_path / "offline.json"
    run_bench("throughput", model, *WORKLOAD, "--max-concurrency", "4", "--output-json", str(offline_path))
    offline = json.loads(offline_path.read_text())
    for key in ("num_completed", "total_input_tokens", "total_output_tokens"):
        assert offline[key] == report[key], key
