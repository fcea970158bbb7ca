"""Clear errors and the conventions users bring from vLLM / TensorRT-LLM, in the LLM API and the CLI:
integer ranges and invalid Unicode as ValueErrors naming the field, capped logprobs and n, one
default max_tokens, hashed n > 1 seeds, cancelled awaits that abort, vLLM's LLM arguments, chat,
get_tokenizer and prompt_token_ids, and Ctrl+C in `rtllm generate`."""
import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoTokenizer

from rtllm import LLM, KvCacheConfig, SamplingParams
from rtllm.cli import build_parser

GREEDY = dict(temperature=0.0, ignore_eos=True)
MAX_SEQ_LEN = 96
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(checkpoint, kv_cache_config=KvCacheConfig(max_tokens=4096, tokens_per_block=16), seed=1,
             max_batch_size=8, max_input_len=64, max_seq_len=MAX_SEQ_LEN, max_num_tokens=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def hf_chat_ids(hf_tokenizer, messages, **options):
    """HF's rendering of a conversation, tokenized as HF's apply_chat_template does (no added bos)."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, **options)
    return hf_tokenizer.encode(text, add_special_tokens=False)


# Finding 9: raw errors.

@pytest.mark.parametrize("name,value,limit", [
    ("top_k", 2**40, "2147483647"), ("stop_token_ids", [2**40], "2147483647"),
    ("end_id", 2**63, "2147483647"), ("seed", 2**64, "2**64"), ("max_tokens", 2**31, "2147483647"),
])
def test_out_of_range_ints_are_value_errors_naming_field_and_limit(name, value, limit):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    assert str(info.value).startswith(f"{name}=") and limit in str(info.value)


@pytest.mark.parametrize("value", [5, 2.5, {"a": 1}, b"stop"])
def test_stop_of_a_wrong_type_is_a_value_error(value):
    with pytest.raises(ValueError, match="stop=.*is invalid: it must be a non-empty string"):
        SamplingParams(stop=value)


def test_lone_surrogate_is_a_value_error_naming_the_prompt(llm):
    with pytest.raises(ValueError, match="prompt is not valid Unicode") as info:
        llm.generate("Hello \ud800 world", use_tqdm=False)
    assert info.value.field == "prompt"
    with pytest.raises(ValueError, match="messages is not valid Unicode"):
        llm.chat([{"role": "user", "content": "bad \udfff"}], use_tqdm=False)
    # The LLM keeps serving.
    assert llm.generate("Hello world", SamplingParams(max_tokens=2), use_tqdm=False).outputs[0].length == 2


def test_ctrl_c_in_generate_prints_one_line(checkpoint):
    """SIGINT while `rtllm generate --stream` prints: a one-line message, no traceback."""
    process = subprocess.Popen(
        [sys.executable, "-m", "rtllm.cli", "generate", "--model", checkpoint, "--stream", "--ignore-eos",
         "--max-tokens", "100000", "--temperature", "0", "Hello"] + ["Hello world"] * 2000,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        # unbuffered, so the first byte arrives while it generates (not at exit, when it is too late to interrupt)
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout.read(1), "rtllm generate printed nothing"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    stderr = stderr.decode()
    assert "Traceback" not in stderr and stderr.strip() == "rtllm generate: interrupted", stderr
    assert process.returncode == 130


# Finding 10: surprises.

def test_logprobs_and_n_are_capped_as_the_server_caps_them():
    assert SamplingParams(logprobs=20, prompt_logprobs=20, n=128).n == 128
    for name, value, limit in (("logprobs", 21, "20"), ("logprobs", 100000, "20"),
                               ("prompt_logprobs", 21, "20"), ("n", 129, "128"), ("n", 10**6, "128")):
        with pytest.raises(ValueError) as info:
            SamplingParams(**{name: value})
        assert info.value.field == name and limit in str(info.value)


def test_default_max_tokens_is_the_context_in_every_entry_point(llm):
    assert SamplingParams().max_tokens is None
    assert build_parser().parse_args(["generate", "x"]).max_tokens is None
    prompt = [5, 6, 7, 8]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(**GREEDY), use_tqdm=False).outputs[0]
    assert (out.length, out.finish_reason) == (MAX_SEQ_LEN - len(prompt), "length")


def test_n_sample_seeds_are_hashed_not_consecutive(llm):
    """Sample i of a request seeded s is not the sample of a request seeded s + i."""
    params = dict(max_tokens=16, temperature=1.0, ignore_eos=True)
    many = llm.generate("Seeds", SamplingParams(seed=40, n=4, **params), use_tqdm=False).outputs
    for i in range(1, 4):
        other = llm.generate("Seeds", SamplingParams(seed=40 + i, **params), use_tqdm=False).outputs[0]
        assert many[i].token_ids != other.token_ids
    assert many[0].token_ids == llm.generate("Seeds", SamplingParams(seed=40, **params),
                                             use_tqdm=False).outputs[0].token_ids
    assert len({tuple(s.token_ids) for s in many}) == 4


def test_cancelling_the_awaiting_task_aborts_the_request(tiny_model):
    with LLM(str(tiny_model("llama", max_position_embeddings=4096)), max_seq_len=4096, max_input_len=64, max_batch_size=4,
             kv_cache_config=KvCacheConfig(max_tokens=8192, tokens_per_block=16)) as llm:
        result = llm.generate_async("A long story", SamplingParams(**GREEDY))

        async def cancel_while_awaiting():
            task = asyncio.ensure_future(result.aresult())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_while_awaiting())
        final = result.result(timeout=60).outputs[0]
        assert final.finish_reason == "cancelled" and final.length < 4096 - 8
        deadline = time.monotonic() + 10
        while llm.get_stats()["kv_cache"]["num_used_blocks"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


# What to build, 6: the LLM's vLLM conventions.

def test_vllm_llm_arguments_mean_what_they_mean_in_vllm(checkpoint, llm):
    long_prompt = list(range(2, 50))
    for _ in range(2):  # prefix caching is on by default: the second run reuses blocks
        llm.generate({"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert llm.get_stats()["kv_cache"]["num_reused_blocks"] > 0
    with LLM(checkpoint, max_model_len=80, max_num_seqs=3, gpu_memory_utilization=0.5,
             enable_prefix_caching=False, enable_chunked_prefill=True,
             kv_cache_config=KvCacheConfig(max_tokens=2048, tokens_per_block=16)) as llm:
        assert llm.max_seq_len == 80 and llm._engine.max_batch_size == 3
        assert llm._scheduler_config.enable_chunked_prefill
        # No prefix caching: the same prompt twice reuses no block.
        llm.generate({"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=2), use_tqdm=False)
        llm.generate({"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=2), use_tqdm=False)
        assert llm.get_stats()["kv_cache"]["num_reused_blocks"] == 0
    with pytest.raises(ValueError, match="max_model_len=64 and max_seq_len=80 disagree"):
        LLM(checkpoint, max_model_len=64, max_seq_len=80)
    with pytest.raises(ValueError, match="gpu_memory_utilization=0.5 and kv_cache_config"):
        LLM(checkpoint, gpu_memory_utilization=0.5, kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.3))
    with pytest.raises(ValueError, match="trust_remote_code=True is not supported"):
        LLM(checkpoint, trust_remote_code=True)
    with pytest.raises(ValueError, match="revision='main' is not supported"):
        LLM(checkpoint, revision="main")


def test_chat_matches_generate_on_the_hf_rendering(llm, hf_tokenizer):
    params = SamplingParams(max_tokens=6, **GREEDY)
    ids = hf_chat_ids(hf_tokenizer, MESSAGES, add_generation_prompt=True)
    expected = llm.generate({"prompt_token_ids": ids}, params, use_tqdm=False).outputs[0].token_ids
    outputs = llm.chat(MESSAGES, params, use_tqdm=False)
    assert len(outputs) == 1 and outputs[0].prompt_token_ids == ids
    assert outputs[0].outputs[0].token_ids == expected
    two = llm.chat([MESSAGES, MESSAGES[1:]], params, use_tqdm=False)
    assert [o.prompt_token_ids for o in two] == [
        ids, hf_chat_ids(hf_tokenizer, MESSAGES[1:], add_generation_prompt=True)]
    prefilled = MESSAGES + [{"role": "assistant", "content": "Hi, I am"}]
    out = llm.chat(prefilled, params, add_generation_prompt=False, continue_final_message=True,
                   use_tqdm=False)[0]
    assert out.prompt_token_ids == hf_chat_ids(hf_tokenizer, prefilled, continue_final_message=True)
    with pytest.raises(ValueError, match="add_generation_prompt and continue_final_message"):
        llm.chat(prefilled, params, continue_final_message=True)


def test_get_tokenizer_and_prompt_token_ids(llm):
    assert llm.get_tokenizer() is llm.tokenizer and llm.get_tokenizer() is not None
    params = SamplingParams(max_tokens=5, **GREEDY)
    ids = llm.get_tokenizer().encode("Hello world")
    one = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
    assert one.prompt_token_ids == ids
    assert one.outputs[0].token_ids == llm.generate({"prompt_token_ids": ids}, params,
                                                    use_tqdm=False).outputs[0].token_ids
    both = llm.generate(prompt_token_ids=[ids, ids[:2]], sampling_params=params, use_tqdm=False)
    assert [o.prompt_token_ids for o in both] == [ids, ids[:2]]
    with pytest.raises(ValueError, match="both inputs and prompt_token_ids"):
        llm.generate("x", prompt_token_ids=ids)


def test_stop_reason_in_outputs(llm):
    out = llm.generate({"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=8, **GREEDY),
                       use_tqdm=False).outputs[0]
    stop_id = out.token_ids[3]
    stopped = llm.generate({"prompt_token_ids": [5, 6]},
                           SamplingParams(max_tokens=8, stop_token_ids=[stop_id], **GREEDY),
                           use_tqdm=False).outputs[0]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)
    assert stopped.token_ids == out.token_ids[:out.token_ids.index(stop_id) + 1]
    assert (out.finish_reason, out.stop_reason) == ("length", None)
