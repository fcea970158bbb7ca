"""`rtllm serve`'s app on a real uvicorn server (a background thread) over a tiny random-weight Llama:
the official OpenAI client against LLM.generate, streaming, n, stop, logprobs, usage, 64 concurrent
streams with early disconnects that must free every KV block, and the Prometheus metrics."""
import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

import rtllm
from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.serve.app import CHAT_PAGE, build_app

MODEL = "tiny-llama"
MAX_SEQ_LEN = 4096
GREEDY = dict(temperature=0.0, extra_body={"ignore_eos": True})  # for the openai client
GREEDY_BODY = {"temperature": 0.0, "ignore_eos": True}  # for raw HTTP
TIMEOUT_S = 60


@contextlib.contextmanager
def serving(app):
    """Runs `app` on a free loopback port in a background thread; yields its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT_S)
        sock.close()


@pytest.fixture(scope="module")
def llm(tiny_model):
    checkpoint = str(tiny_model("llama", max_position_embeddings=MAX_SEQ_LEN))
    kv = KvCacheConfig(max_tokens=96 * 1024, tokens_per_block=16)
    with LLM(checkpoint, kv_cache_config=kv, max_batch_size=64, max_seq_len=MAX_SEQ_LEN,
             max_input_len=256, max_num_tokens=1024) as llm:
        yield llm


@pytest.fixture(scope="module")
def base_url(llm):
    with serving(build_app(llm, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0) as c:
        yield c


def reference(llm, prompt, **params):
    """LLM.generate's output for a text prompt or token ids, greedy unless told otherwise."""
    params = {"temperature": 0.0, "ignore_eos": True, **params}
    prompt = {"prompt_token_ids": prompt} if isinstance(prompt, list) else prompt
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)


def chat_ids(llm, content):
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=True)


def test_plain_routes(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    assert httpx.get(base_url + "/version").json() == {"version": rtllm.__version__}
    (model,) = httpx.get(base_url + "/v1/models").json()["data"]
    assert model["id"] == MODEL and model["object"] == "model" and model["max_model_len"] == MAX_SEQ_LEN
    page = httpx.get(base_url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    with open(CHAT_PAGE, "rb") as f:
        assert page.content == f.read()


def test_completion_matches_llm_generate(llm, client):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY)
    expected = reference(llm, prompt, max_tokens=12).outputs[0]
    (choice,) = out.choices
    assert choice.text == expected.text and choice.finish_reason == "length" and choice.index == 0
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    prompt_len = len(llm.tokenizer.encode(prompt))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (prompt_len, 12, prompt_len + 12)


def test_completion_of_token_ids_and_prompt_lists(llm, client):
    prompts = ["Hello world", "def main():"]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, n=2, **GREEDY)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt index * n + sample index
    for i, prompt in enumerate(prompts):
        expected = reference(llm, prompt, max_tokens=6).outputs[0].text
        assert out.choices[2 * i].text == out.choices[2 * i + 1].text == expected
    ids = llm.tokenizer.encode("Hello world")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids.choices[0].text == out.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_completion_stream_with_usage(llm, client):
    prompt = "Café, naïve, 你好"  # multi-byte characters must never be split across chunks
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    *text_chunks, usage_chunk = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == reference(llm, prompt, max_tokens=20).outputs[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 20
    assert usage_chunk.usage.prompt_tokens == len(llm.tokenizer.encode(prompt))


def test_chat_matches_llm_generate(llm, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    expected = reference(llm, ids, max_tokens=10).outputs[0].text
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, **GREEDY)
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == "length" and out.object == "chat.completion"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10
    # Text content parts are joined; the stream carries the same text.
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                        {"type": "text", "text": "there"}]}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=parts, max_tokens=10, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_seeded_samples_match_llm_generate(llm, client):
    params = dict(max_tokens=8, temperature=0.9, top_p=0.95, top_k=50, seed=11)
    expected = reference(llm, "Sample me", n=3, **params).outputs
    out = client.completions.create(model=MODEL, prompt="Sample me", n=3, max_tokens=8, temperature=0.9,
                                    top_p=0.95, seed=11, extra_body={"top_k": 50, "ignore_eos": True})
    assert [c.text for c in out.choices] == [e.text for e in expected]
    assert len({c.text for c in out.choices}) > 1  # different seeds per sample
    stream = client.completions.create(model=MODEL, prompt="Sample me", n=3, max_tokens=8, temperature=0.9,
                                       top_p=0.95, seed=11, stream=True,
                                       extra_body={"top_k": 50, "ignore_eos": True})
    texts = ["", "", ""]
    for chunk in stream:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
    assert texts == [e.text for e in expected]


def stop_string_in(text):
    """A two-character stop string that occurs after the text's start, free of U+FFFD."""
    for start in range(len(text) // 3, len(text) - 1):
        candidate = text[start:start + 2]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    pytest.fail(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(llm, client, stream):
    prompt = "Hello world! Hello there"
    full = reference(llm, prompt, max_tokens=40).outputs[0].text
    stop = stop_string_in(full)
    expected = full[:full.find(stop)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stop=[stop, "\x00never"],
                                    stream=stream, **GREEDY)
    if stream:
        chunks = list(out)
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = out.choices[0].text, out.choices[0].finish_reason
    assert (text, reason) == (expected, "stop")


def test_logprobs_match_llm_generate(llm, client):
    prompt = "The lazy dog"
    expected = reference(llm, prompt, max_tokens=5, logprobs=2).outputs[0]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, **GREEDY)
    logprobs = out.choices[0].logprobs
    sampled = [entry[t] for entry, t in zip(expected.logprobs, expected.token_ids)]
    assert logprobs.token_logprobs == pytest.approx(sampled)
    assert logprobs.tokens == [llm.tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    for top, entry in zip(logprobs.top_logprobs, expected.logprobs):
        assert 1 <= len(top) <= 3  # the top 2, plus the sampled token if it is not among them
        assert max(top.values()) == pytest.approx(max(entry.values()))
    chat_expected = reference(llm, chat_ids(llm, prompt), max_tokens=5, logprobs=2).outputs[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=5, logprobs=True, top_logprobs=2, **GREEDY)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [e[t] for e, t in zip(chat_expected.logprobs, chat_expected.token_ids)])
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
               for c in content)
    assert all(c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)  # greedy


@pytest.mark.parametrize("stream", [False, True])
def test_echo_returns_the_prompt_and_its_logprobs(llm, client, stream):
    prompt = "The quick brown fox"
    expected = reference(llm, prompt, max_tokens=4, logprobs=1, prompt_logprobs=1)
    prompt_ids = expected.prompt_token_ids
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=1, echo=True,
                                    stream=stream, **GREEDY)
    chunks = list(out) if stream else [out]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + expected.outputs[0].text
    token_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                      for lp in c.choices[0].logprobs.token_logprobs]
    scored = [entry[t] for entry, t in zip(expected.prompt_logprobs[1:], prompt_ids[1:])]
    sampled = [entry[t] for entry, t in zip(expected.outputs[0].logprobs, expected.outputs[0].token_ids)]
    assert token_logprobs[0] is None  # the prompt's first token has no logprob, as OpenAI's echo
    assert token_logprobs[1:] == pytest.approx(scored + sampled)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, echo=True, **GREEDY)
    assert plain.choices[0].text == prompt + expected.outputs[0].text and plain.choices[0].logprobs is None


def test_logit_bias_forces_and_bans_tokens_like_llm_generate(llm, client):
    prompt = "The lazy dog"
    plain = reference(llm, prompt, max_tokens=6).outputs[0]
    forced_id = (plain.token_ids[0] + 7) % llm.vocab_size
    forced = reference(llm, prompt, max_tokens=6, logit_bias={forced_id: 100.0}).outputs[0]
    assert forced.token_ids == [forced_id] * 6
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                    logit_bias={str(forced_id): 100}, **GREEDY)
    assert out.choices[0].text == forced.text
    banned = reference(llm, prompt, max_tokens=6, logit_bias={t: -100.0 for t in plain.token_ids}).outputs[0]
    assert not set(banned.token_ids) & set(plain.token_ids)
    chat_banned = reference(llm, chat_ids(llm, prompt), max_tokens=6,
                            logit_bias={t: -100.0 for t in plain.token_ids}).outputs[0]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                          max_tokens=6, logit_bias={str(t): -100 for t in plain.token_ids},
                                          **GREEDY)
    assert chat.choices[0].message.content == chat_banned.text
    assert not set(chat_banned.token_ids) & set(plain.token_ids)


def metric_values(base_url) -> dict:
    """{(sample name, labels): value} from /metrics, through Prometheus' own parser."""
    text = httpx.get(base_url + "/metrics", timeout=TIMEOUT_S).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def outcome(values, name):
    return values[("rtllm:requests_total", (("outcome", name),))]


def wait_until(condition, what, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_metrics_count_the_requests_made(llm):
    with serving(build_app(llm, MODEL)) as url:  # a fresh server: its counters start at zero
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        full = reference(llm, "Count me", max_tokens=30).outputs[0].text
        usages = [client.completions.create(model=MODEL, prompt="Count me", max_tokens=6, n=2, **GREEDY).usage,
                  client.completions.create(model=MODEL, prompt="Count me", max_tokens=30,
                                            stop=stop_string_in(full), **GREEDY).usage,
                  client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True},
                                                 **GREEDY)]
        usages[2] = list(usages[2])[-1].usage
        with pytest.raises(openai.BadRequestError):  # rejected before it runs: not counted
            client.completions.create(model=MODEL, prompt="x", temperature=-1)
        values = metric_values(url)
        assert {o: outcome(values, o) for o in ("stop", "length", "abort", "error")} == \
            {"stop": 1, "length": 3, "abort": 0, "error": 0}
        assert values[("rtllm:prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
        assert values[("rtllm:generation_tokens_total", ())] == sum(u.completion_tokens for u in usages)
        for name in ("rtllm:time_to_first_token_seconds", "rtllm:e2e_request_latency_seconds"):
            assert values[(name + "_count", ())] == 3
            assert values[(name + "_bucket", (("le", "+Inf"),))] == 3
        assert values[("rtllm:time_per_output_token_seconds_count", ())] == 4  # one per sequence
        assert values[("rtllm:num_requests_running", ())] == values[("rtllm:num_requests_waiting", ())] == 0
        assert 0 <= values[("rtllm:kv_cache_usage_ratio", ())] <= 1

        # Clients that leave early, streamed or not, are counted as aborted once the server sees
        # the disconnect, and their requests are cut short.
        stats_before = llm.get_stats()
        body = {"model": MODEL, "prompt": "Leave early", "max_tokens": 3000, **GREEDY_BODY}
        asyncio.run(stream_completion(url, {**body, "stream": True}, leave_after=2))
        wait_until(lambda: outcome(metric_values(url), "abort") == 1, "the stream's abort to be counted")
        leave_while_running(url, llm, body)
        wait_until(lambda: outcome(metric_values(url), "abort") == 2, "the request's abort to be counted")
        assert outcome(metric_values(url), "length") == 3
        wait_until(lambda: llm.get_stats()["kv_cache"]["num_used_blocks"] == 0, "every KV block to be free")
        assert llm.get_stats()["num_generated_tokens"] - stats_before["num_generated_tokens"] < 3000


def leave_while_running(base_url, llm, body):
    """Sends a non-streamed completion over a raw socket and closes the connection as soon as the
    engine runs the request."""
    payload = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode()
    port = int(base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        sock.sendall(head + payload)
        wait_until(lambda: llm.get_stats()["num_active_requests"] == 1, "the engine to run the request")


async def stream_completion(base_url, body, leave_after=None, client=None):
    """Streams /v1/completions; returns (text, finish reason, saw [DONE]). With `leave_after`,
    closes the connection after that many chunks."""
    async with contextlib.AsyncExitStack() as stack:
        if client is None:
            client = await stack.enter_async_context(httpx.AsyncClient(timeout=TIMEOUT_S))
        text, reason, num_chunks = "", None, 0
        async with client.stream("POST", base_url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text, reason, True
                (choice,) = json.loads(line[len("data: "):])["choices"]
                text += choice["text"]
                reason = choice["finish_reason"] or reason
                num_chunks += 1
                if num_chunks == leave_after:
                    return text, reason, False
        return text, reason, False


def test_concurrent_streams_match_and_disconnects_free_kv_blocks(llm):
    words = "the quick brown fox jumps over the lazy dog hello world how are you today".split()
    prompts = [f"{i}: " + " ".join(words[i % 7:i % 7 + 3 + i % 5]) for i in range(64)]
    leaving = set(range(0, 64, 4))  # a quarter disconnect after a few chunks
    short = {"max_tokens": 16, **GREEDY_BODY}
    long = {"max_tokens": 3000, **GREEDY_BODY}  # seconds of work: only an abort ends it early

    async def run(url):
        limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
            alone = {}
            for i in sorted(set(range(64)) - leaving):  # one at a time, not streamed
                body = {"model": MODEL, "prompt": prompts[i], **short}
                response = await client.post(url + "/v1/completions", json=body)
                alone[i] = response.json()["choices"][0]["text"]
            stats_before = llm.get_stats()
            streams = await asyncio.gather(*(
                stream_completion(url, {"model": MODEL, "prompt": p, "stream": True,
                                        **(long if i in leaving else short)},
                                  leave_after=3 if i in leaving else None, client=client)
                for i, p in enumerate(prompts)))
            return alone, stats_before, streams

    with serving(build_app(llm, MODEL)) as url:
        alone, stats_before, streams = asyncio.run(run(url))
        for i, (text, reason, done) in enumerate(streams):
            if i not in leaving:
                assert done and reason == "length" and text == alone[i], f"stream {i}"
        # Every aborted request gives its blocks back (reusable cached blocks count as free) ...
        wait_until(lambda: llm.get_stats()["kv_cache"]["num_used_blocks"] == 0, "every KV block to be free")
        wait_until(lambda: outcome(metric_values(url), "abort") == len(leaving), "the aborts to be counted")
        values = metric_values(url)  # the requests served alone count too
        assert outcome(values, "length") == 2 * (64 - len(leaving)) and outcome(values, "error") == 0
        # ... and was cut short: it did not run to its 3000 tokens.
        generated = llm.get_stats()["num_generated_tokens"] - stats_before["num_generated_tokens"]
        assert generated < (64 - len(leaving)) * 16 + len(leaving) * 3000 // 2


class FailingLLM:
    """The LLM, but requests whose prompt ends with FAIL_TOKEN fail in the engine, as the executor
    fails a request whose responses it cannot handle."""

    FAIL_TOKEN = 7

    def __init__(self, llm):
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def generate_async(self, inputs, sampling_params=None, streaming=False, **kwargs):
        result = self._llm.generate_async(inputs, sampling_params, streaming=streaming, **kwargs)
        if inputs["prompt_token_ids"][-1] == self.FAIL_TOKEN:
            result._fail("injected failure")
        return result


def test_a_failing_request_fails_alone(llm):
    # Long enough that the failure lands while the request runs.
    failing = {"model": MODEL, "prompt": [5, 6, FailingLLM.FAIL_TOKEN], "max_tokens": 3000, "n": 2,
               **GREEDY_BODY}
    with serving(build_app(FailingLLM(llm), MODEL)) as url:
        response = httpx.post(url + "/v1/completions", json=failing, timeout=TIMEOUT_S)
        assert response.status_code == 500 and "injected failure" in response.json()["error"]["message"]
        with httpx.stream("POST", url + "/v1/completions", json={**failing, "stream": True},
                          timeout=TIMEOUT_S) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert "injected failure" in json.loads(events[-2][len("data: "):])["error"]["message"]
        assert events[-1] == "data: [DONE]"
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        with pytest.raises(openai.APIError, match="injected failure"):
            list(client.completions.create(model=MODEL, prompt=failing["prompt"], max_tokens=3000, stream=True))
        out = client.completions.create(model=MODEL, prompt=[5, 6, 8], max_tokens=8, **GREEDY)
        assert out.choices[0].text == reference(llm, [5, 6, 8], max_tokens=8).outputs[0].text
        values = metric_values(url)
        assert outcome(values, "error") == 5 and outcome(values, "length") == 1
    wait_until(lambda: llm.get_stats()["kv_cache"]["num_used_blocks"] == 0, "every KV block to be free")


def test_small_model_chat_default_length_and_503_after_shutdown(tiny_model):
    with LLM(str(tiny_model("llama", max_position_embeddings=MAX_SEQ_LEN)), max_seq_len=64,
             max_batch_size=2, kv_cache_config=KvCacheConfig(max_tokens=256, tokens_per_block=16)) as llm:
        with serving(build_app(llm, MODEL)) as url:
            # Without max_tokens, a chat completion may run to max_seq_len, as OpenAI's does.
            body = {"messages": [{"role": "user", "content": "Go on"}], **GREEDY_BODY}
            chat = httpx.post(url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S).json()
            assert chat["choices"][0]["finish_reason"] == "length"
            assert chat["usage"]["completion_tokens"] == 64 - len(chat_ids(llm, "Go on"))
            assert httpx.get(url + "/health", timeout=TIMEOUT_S).status_code == 200
            llm.shutdown()
            health = httpx.get(url + "/health", timeout=TIMEOUT_S)
            response = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=TIMEOUT_S)
    assert health.status_code == 503 and health.json()["error"]["type"] == "service_unavailable"
    assert response.status_code == 503 and "shut down" in response.json()["error"]["message"]
