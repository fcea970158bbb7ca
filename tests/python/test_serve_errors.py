"""`rtllm serve` started from the command line with an API key: raw HTTP error cases each get their
status and an OpenAI-format error, and the server keeps serving after every one of them."""
import socket
import subprocess
import sys

import httpx
import openai
import pytest

from rtllm.cli import build_parser
from serve_process import free_port, stop, wait_until_healthy

API_KEY = "test-key-123"
MAX_SEQ_LEN = 128
MAX_BODY_BYTES = 16 * 1024
TIMEOUT_S = 60
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def rtllm(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "rtllm.cli", *args], **kwargs)


@pytest.fixture(scope="module")
def base_url(tiny_model, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with open(log_path, "w") as log:
        process = rtllm("serve", str(tiny_model("llama")), "--port", str(port), "--api-key", API_KEY,
                        "--served-model-name", "tiny", "--max-seq-len", str(MAX_SEQ_LEN),
                        "--max-batch-size", "4", "--max-kv-tokens", "2048", "--max-body-bytes",
                        str(MAX_BODY_BYTES), "--log-level", "warning", stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, log_path, TIMEOUT_S)
        yield url
    finally:
        stop(process, TIMEOUT_S)


def assert_error(response, status, param=None, fragments=()):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["param"] == param
    for fragment in fragments:
        assert fragment in error["message"]


def assert_still_serving(base_url):
    response = httpx.post(base_url + "/v1/completions", headers=AUTH, timeout=TIMEOUT_S,
                          json={"model": "tiny", "prompt": "still there?", "max_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_parser_has_serve_options():
    args = build_parser().parse_args(["serve", "m", "--port", "0", "--api-key", "k", "--max-kv-tokens", "64",
                                      "--kv-cache-fraction", "0.5", "--device", "cpu", "--dtype", "float32"])
    assert (args.model, args.port, args.api_key, args.host) == ("m", 0, "k", "127.0.0.1")
    assert (args.max_kv_tokens, args.kv_cache_fraction, args.max_body_bytes) == (64, 0.5, 1 << 20)


def test_taken_port_fails_before_loading_the_model():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        process = rtllm("serve", "/nonexistent", "--port", str(taken.getsockname()[1]),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 2 and "rtllm serve: error" in err and "in use" in err


def test_api_key(base_url):
    assert httpx.get(base_url + "/health", timeout=TIMEOUT_S).status_code == 200  # open for probes
    assert httpx.get(base_url + "/", timeout=TIMEOUT_S).status_code == 200  # the chat page asks for the key
    for path in ("/v1/models", "/metrics", "/version"):
        assert_error(httpx.get(base_url + path, timeout=TIMEOUT_S), 401)
        wrong = {"Authorization": f"Bearer {API_KEY}x"}
        assert_error(httpx.get(base_url + path, headers=wrong, timeout=TIMEOUT_S), 401)
        assert httpx.get(base_url + path, headers=AUTH, timeout=TIMEOUT_S).status_code == 200
    assert_error(httpx.post(base_url + "/v1/completions", json={"prompt": "hi"}, timeout=TIMEOUT_S), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert_still_serving(base_url)


COMPLETION = {"model": "tiny", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
BAD_BODIES = [  # (route, body, status, param, fragments of the message)
    ("completions", b"{not json", 400, None, ["not valid JSON"]),
    ("completions", b"", 400, None, ["not valid JSON"]),
    ("completions", b"[1, 2]", 400, None, ["JSON object"]),
    ("completions", {"model": "tiny"}, 400, "prompt", ["'prompt' is required"]),
    ("chat/completions", {"model": "tiny"}, 400, "messages", ["'messages' is required"]),
    ("chat/completions", {**CHAT, "messages": []}, 400, "messages", ["empty"]),
    ("chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, 400, "messages.0.role", ["required"]),
    ("chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", ["robot"]),
    ("completions", {**COMPLETION, "model": "gpt-9"}, 404, "model", ["gpt-9", "tiny"]),
    ("completions", {**COMPLETION, "max_tokens": 500}, 400, "max_tokens", ["max_tokens=500", "max_seq_len=128"]),
    ("chat/completions", {**CHAT, "max_completion_tokens": 500}, 400, "max_tokens",
     ["max_tokens=500", "max_seq_len=128"]),
    ("completions", {**COMPLETION, "prompt": "hello " * 200}, 400, "prompt", ["max_seq_len=128"]),
    ("completions", {**COMPLETION, "temperature": -0.5}, 400, "temperature", ["temperature=-0.5", ">= 0"]),
    ("completions", {**COMPLETION, "top_p": 1.5}, 400, "top_p", ["top_p=1.5", "(0, 1]"]),
    ("completions", {**COMPLETION, "top_k": -3}, 400, "top_k", ["top_k=-3"]),
    ("completions", {**COMPLETION, "min_p": 2}, 400, "min_p", ["min_p=2"]),
    ("completions", {**COMPLETION, "presence_penalty": 3}, 400, "presence_penalty",
     ["presence_penalty=3", "[-2, 2]"]),
    ("completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens", ["max_tokens=0", ">= 1"]),
    ("completions", {**COMPLETION, "n": 0}, 400, "n", ["n=0"]),
    ("completions", {**COMPLETION, "seed": -1}, 400, "seed", ["seed=-1"]),
    ("completions", {**COMPLETION, "stop": ""}, 400, "stop", ["stop"]),
    ("completions", {**COMPLETION, "stop": 7}, 400, "stop", ["stop=7"]),
    ("completions", {**COMPLETION, "logprobs": 50}, 400, "logprobs", ["logprobs=50", "20"]),
    ("completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature", ["'hot'"]),
    ("completions", {**COMPLETION, "max_tokens": 2.5}, 400, "max_tokens", ["2.5"]),
    ("completions", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", ["prompt="]),
    ("completions", {**COMPLETION, "prompt": [99999]}, 400, "prompt", ["99999", "vocab_size"]),
    ("chat/completions", {**CHAT, "top_k": 2**40}, 400, "top_k", [str(2**40), "2147483647"]),
    ("completions", {**COMPLETION, "stop_token_ids": [2**40]}, 400, "stop_token_ids", [str(2**40), "2147483647"]),
    # rejected only by the C++ executor at enqueue: the engine's vocabulary
    ("completions", {**COMPLETION, "stop_token_ids": [99999]}, 400, "stop_token_ids", ["99999", "vocabulary"]),
    ("chat/completions", {**CHAT, "min_tokens": 5}, 400, "min_tokens", ["min_tokens=5", "max_tokens=4"]),
    ("completions", {**COMPLETION, "logit_bias": {"abc": 5}}, 400, "logit_bias", ["'abc'", "token id"]),
    ("completions", {**COMPLETION, "logit_bias": {"-1": 5}}, 400, "logit_bias", ["'-1'"]),
    ("completions", {**COMPLETION, "logit_bias": {"3": 101}}, 400, "logit_bias", ["101", "[-100, 100]"]),
    ("completions", {**COMPLETION, "logit_bias": {"3": "high"}}, 400, "logit_bias", ["'high'"]),
    ("completions", {**COMPLETION, "logit_bias": {"99999": 1}}, 400, "logit_bias", ["99999", "vocab_size="]),
    ("chat/completions", {**CHAT, "logit_bias": {"3": -100.5}}, 400, "logit_bias", ["-100.5"]),
    ("chat/completions", {**CHAT, "logit_bias": {"99999": 1}}, 400, "logit_bias", ["99999", "vocab_size="]),
    ("chat/completions", {**CHAT, "logit_bias": [1, 2]}, 400, "logit_bias", ["logit_bias="]),
    ("completions", {**COMPLETION, "stream_options": {"include_usage": True}}, 400, "stream_options", ["stream"]),
    ("chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs", ["logprobs=true"]),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages.0.content", ["text"]),
]


@pytest.mark.parametrize("route,body,status,param,fragments", BAD_BODIES,
                         ids=[f"{i}-{b[0]}-{b[3]}" for i, b in enumerate(BAD_BODIES)])
def test_bad_request(base_url, route, body, status, param, fragments):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{base_url}/v1/{route}", headers={**AUTH, "Content-Type": "application/json"},
                          timeout=TIMEOUT_S, **kwargs)
    assert_error(response, status, param, fragments)
    assert_still_serving(base_url)


@pytest.mark.parametrize("field,value,core", [("top_p", 1.5, dict(top_p=1.5)),
                                              ("repetition_penalty", 0, dict(repetition_penalty=0.0))])
def test_range_error_is_the_cores_with_its_field(base_url, field, value, core):
    """A range only C++ checks: the 400 carries C++'s message and its field as param."""
    from rtllm import InvalidArgumentError, _core
    with pytest.raises(InvalidArgumentError) as from_cpp:
        _core.SamplingConfig(**core).validate()
    response = httpx.post(base_url + "/v1/completions", headers=AUTH, timeout=TIMEOUT_S,
                          json={**COMPLETION, field: value})
    assert_error(response, 400, from_cpp.value.field, [str(from_cpp.value)])
    assert response.json()["error"]["message"] == str(from_cpp.value)


def test_param_comes_from_the_errors_field_not_its_message():
    """protocol.py reads InvalidArgumentError.field: a message naming another field changes nothing."""
    from unittest import mock

    from rtllm import InvalidArgumentError
    from rtllm.serve import protocol
    req = protocol.parse_request(protocol.CompletionRequest, {"prompt": "hi", "temperature": 0.5})
    misleading = InvalidArgumentError("top_p=3 is invalid: it must be in (0, 1]", "temperature")
    with mock.patch.object(protocol, "SamplingParams", side_effect=misleading):
        with pytest.raises(protocol.APIError) as info:
            req.sampling_params(4, None)
    assert (info.value.status, info.value.param, info.value.message) == (400, "temperature", str(misleading))
    assert "import re" not in open(protocol.__file__).read()


def test_unknown_route_and_method(base_url):
    assert_error(httpx.get(base_url + "/v1/nothing", headers=AUTH, timeout=TIMEOUT_S), 404, None, ["/v1/nothing"])
    assert_error(httpx.get(base_url + "/v1/completions", headers=AUTH, timeout=TIMEOUT_S), 405)


def test_body_over_the_limit(base_url):
    big = {**COMPLETION, "prompt": "x" * MAX_BODY_BYTES}
    response = httpx.post(base_url + "/v1/completions", headers=AUTH, json=big, timeout=TIMEOUT_S)
    assert_error(response, 413, None, [str(MAX_BODY_BYTES)])

    def chunks():  # chunked transfer encoding: no Content-Length to check up front
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(base_url + "/v1/completions", headers=AUTH, content=chunks(), timeout=TIMEOUT_S)
    assert_error(response, 413, None, [str(MAX_BODY_BYTES)])
    assert_still_serving(base_url)


def test_openai_client_sees_bad_requests(base_url):
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=API_KEY, timeout=TIMEOUT_S, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="top_p=0"):
        client.completions.create(model="tiny", prompt="hi", top_p=0)
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3


def test_without_the_serve_extra():
    # fastapi None in sys.modules: `import fastapi` fails. rtllm and its CLI must still import,
    # and `rtllm serve` must say what to install.
    code = ("import sys; sys.modules['fastapi'] = None\n"
            "import rtllm, rtllm.cli\n"
            "sys.exit(rtllm.cli.main(['serve', '--port', '0']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1 and "pip install 'rtllm[serve]'" in result.stderr, result.stderr
