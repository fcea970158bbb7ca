"""The server's clear errors and conventions, on 127.0.0.1: out-of-range integers and invalid Unicode
as 400s naming the field, the bearer scheme in any case, tool_choice without tools, one default
max_tokens, stop_reason in choices, /v1/models/{id}, /tokenize and /detokenize (vLLM's shapes, HF's
tokenizer as the reference), continue_final_message / add_generation_prompt, --chat-template and
vLLM's flag names."""
import json

import httpx
import pytest
from transformers import AutoTokenizer

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.cli import build_parser
from rtllm.serve.app import build_app

from test_serve import serving

MODEL = "tiny"
MAX_SEQ_LEN = 80
API_KEY = "conv-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY_BODY = {"temperature": 0.0, "ignore_eos": True}
TIMEOUT_S = 60
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
# Another template than the tokenizer's, for --chat-template.
OTHER_TEMPLATE = ("{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}[ASSISTANT]{% endif %}")


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(checkpoint, max_seq_len=MAX_SEQ_LEN, max_input_len=64, max_batch_size=4,
             kv_cache_config=KvCacheConfig(max_tokens=1024, tokens_per_block=16)) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def base_url(llm):
    with serving(build_app(llm, MODEL, api_key=API_KEY)) as url:
        yield url


def post(base_url, path, body, headers=AUTH):
    # json.dumps escapes non-ASCII (lone surrogates included) as \uXXXX: valid JSON in any case.
    return httpx.post(base_url + path, content=json.dumps(body).encode(), timeout=TIMEOUT_S,
                      headers={"Content-Type": "application/json", **headers})


def assert_400(response, param, *fragments):
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    for fragment in fragments:
        assert fragment in error["message"], error


def hf_chat_ids(hf_tokenizer, messages, template=None, **options):
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template, **options)
    return hf_tokenizer.encode(text, add_special_tokens=False)


def greedy(llm, ids, max_tokens):
    return llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                                  ignore_eos=True), use_tqdm=False).outputs[0]


# Finding 9: raw errors.

@pytest.mark.parametrize("field,value,limit", [
    ("top_k", 2**40, "2147483647"), ("stop_token_ids", [2**40], "2147483647"),
    ("seed", 2**64, "2**64"), ("min_tokens", 2**40, "2147483647"),
])
def test_out_of_range_ints_are_400_naming_field_and_limit(base_url, field, value, limit):
    response = post(base_url, "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value})
    assert_400(response, field, limit)


def test_lone_surrogates_are_400(base_url):
    # Valid JSON whose string holds a lone surrogate (json.dumps writes it as \ud800).
    response = post(base_url, "/v1/completions", {"prompt": "bad \ud800 text", "max_tokens": 2})
    assert_400(response, "prompt", "not valid Unicode")
    response = post(base_url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x\udc00"}]})
    assert_400(response, "messages.0.content", "not valid Unicode")
    response = post(base_url, "/tokenize", {"prompt": "\udbff"})
    assert_400(response, "prompt", "not valid Unicode")
    assert post(base_url, "/v1/completions", {"prompt": "fine", "max_tokens": 2}).status_code == 200


# Finding 10: surprises.

@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_in_any_case(base_url, scheme):
    response = httpx.get(base_url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("header", ["bearer wrong", f"Basic {API_KEY}", API_KEY, f"bearer{API_KEY}", ""])
def test_wrong_credentials_are_still_401(base_url, header):
    assert httpx.get(base_url + "/v1/models", headers={"Authorization": header}).status_code == 401


def test_default_max_tokens_is_the_context_in_both_routes(llm, base_url):
    body = {"prompt": [5, 6, 7], **GREEDY_BODY}
    choice = post(base_url, "/v1/completions", body).json()["choices"][0]
    expected = greedy(llm, [5, 6, 7], MAX_SEQ_LEN - 3)
    assert choice["finish_reason"] == "length" and choice["text"] == expected.text
    chat = post(base_url, "/v1/chat/completions", {"messages": MESSAGES, **GREEDY_BODY}).json()
    num_prompt_tokens = len(llm.tokenizer.apply_chat_template(MESSAGES, tokenize=True))
    assert chat["usage"]["completion_tokens"] == MAX_SEQ_LEN - num_prompt_tokens


# What to build, 6: the server's conventions.

def test_tool_choice_without_tools_is_refused_as_openai_does(base_url):
    for tool_choice in ("auto", "none", {"type": "function", "function": {"name": "f"}}):
        response = post(base_url, "/v1/chat/completions", {"messages": MESSAGES, "tool_choice": tool_choice})
        assert_400(response, "tool_choice", "'tool_choice' is only allowed when 'tools' are specified")


def test_stop_reason_in_choices(llm, base_url):
    plain = greedy(llm, [5, 6], 8)
    stop_id = plain.token_ids[3]
    expected = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(
        max_tokens=8, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]), use_tqdm=False).outputs[0]
    body = {"prompt": [5, 6], "max_tokens": 8, "stop_token_ids": [stop_id], **GREEDY_BODY}
    choice = post(base_url, "/v1/completions", body).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", expected.stop_reason) == ("stop", stop_id)
    choice = post(base_url, "/v1/completions", {**body, "stop_token_ids": None}).json()["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("length", None)
    with httpx.stream("POST", base_url + "/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=TIMEOUT_S) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: {")]
    last = httpx.Response(200, content=lines[-1][6:]).json()["choices"][0]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop_id)


def test_model_by_id(base_url):
    card = httpx.get(base_url + f"/v1/models/{MODEL}", headers=AUTH).json()
    assert card == httpx.get(base_url + "/v1/models", headers=AUTH).json()["data"][0]
    assert card["id"] == MODEL and card["max_model_len"] == MAX_SEQ_LEN
    response = httpx.get(base_url + "/v1/models/other", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_tokenize_and_detokenize_match_hf(base_url, hf_tokenizer):
    text = "Hello world! Café 你好"
    body = post(base_url, "/tokenize", {"model": MODEL, "prompt": text}).json()
    expected = hf_tokenizer.encode(text)
    assert body == {"count": len(expected), "max_model_len": MAX_SEQ_LEN, "tokens": expected, "token_strs": None}
    plain = post(base_url, "/tokenize", {"prompt": text, "add_special_tokens": False,
                                         "return_token_strs": True}).json()
    assert plain["tokens"] == hf_tokenizer.encode(text, add_special_tokens=False)
    assert plain["token_strs"] == [hf_tokenizer.decode([t]) for t in plain["tokens"]]
    chat = post(base_url, "/tokenize", {"messages": MESSAGES}).json()
    assert chat["tokens"] == hf_chat_ids(hf_tokenizer, MESSAGES, add_generation_prompt=True)
    assert post(base_url, "/detokenize", {"tokens": expected}).json() == \
        {"prompt": hf_tokenizer.decode(expected, skip_special_tokens=True)}
    assert_400(post(base_url, "/detokenize", {"tokens": [10**6]}), "tokens", "vocab_size")
    assert_400(post(base_url, "/tokenize", {}), "prompt", "exactly one")
    assert post(base_url, "/tokenize", {"prompt": text}, headers={}).status_code == 401


def test_continue_final_message_and_add_generation_prompt(llm, base_url, hf_tokenizer):
    prefilled = MESSAGES + [{"role": "assistant", "content": "Hi, I am"}]
    body = {"messages": prefilled, "max_tokens": 5, "continue_final_message": True,
            "add_generation_prompt": False, **GREEDY_BODY}
    ids = hf_chat_ids(hf_tokenizer, prefilled, continue_final_message=True)
    choice = post(base_url, "/v1/chat/completions", body).json()["choices"][0]
    assert choice["message"]["content"] == greedy(llm, ids, 5).text
    tokenized = post(base_url, "/tokenize", {"messages": prefilled, "continue_final_message": True,
                                             "add_generation_prompt": False}).json()
    assert tokenized["tokens"] == ids
    no_prompt = post(base_url, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False}).json()
    assert no_prompt["tokens"] == hf_chat_ids(hf_tokenizer, MESSAGES, add_generation_prompt=False)
    response = post(base_url, "/v1/chat/completions", {**body, "add_generation_prompt": True})
    assert_400(response, "continue_final_message", "add_generation_prompt")


def test_chat_template_option(llm, hf_tokenizer, tmp_path):
    from rtllm.serve.cli import _chat_template

    path = tmp_path / "template.jinja"
    path.write_text(OTHER_TEMPLATE)
    assert _chat_template(str(path)) == OTHER_TEMPLATE == _chat_template(OTHER_TEMPLATE)
    with pytest.raises(ValueError, match="neither a file nor a jinja2 template"):
        _chat_template(str(tmp_path / "missing.jinja"))
    assert build_parser().parse_args(["serve", "--chat-template", str(path)]).chat_template == str(path)
    with serving(build_app(llm, MODEL, chat_template=OTHER_TEMPLATE)) as url:
        ids = hf_chat_ids(hf_tokenizer, MESSAGES, template=OTHER_TEMPLATE, add_generation_prompt=True)
        assert post(url, "/tokenize", {"messages": MESSAGES}).json()["tokens"] == ids
        chat = post(url, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 4, **GREEDY_BODY}).json()
        assert chat["usage"]["prompt_tokens"] == len(ids)
        assert chat["choices"][0]["message"]["content"] == greedy(llm, ids, 4).text


def test_vllm_flag_names_are_aliases():
    args = build_parser().parse_args(["serve", "m", "--max-model-len", "64", "--gpu-memory-utilization", "0.5",
                                      "--max-num-seqs", "3"])
    assert (args.max_seq_len, args.kv_cache_fraction, args.max_batch_size) == (64, 0.5, 3)
    args = build_parser().parse_args(["serve", "m", "--max-seq-len", "32", "--kv-cache-fraction", "0.25",
                                      "--max-batch-size", "2"])
    assert (args.max_seq_len, args.kv_cache_fraction, args.max_batch_size) == (32, 0.25, 2)
