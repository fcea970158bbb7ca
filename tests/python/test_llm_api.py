"""The LLM API end to end on a tiny random-weight Llama, against HF transformers (float32, CPU)
and the HF tokenizer: generate, streaming, async, n > 1, stop strings and ids, abort, bad input,
shutdown."""
import asyncio
import gc
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from transformers import AutoTokenizer

import rtllm
from rtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams, _core
from rtllm.models import AutoModelForCausalLM

from hf_reference import hf_greedy, hf_last_logits, load_hf_model

GREEDY = dict(temperature=0.0, ignore_eos=True)
LIMITS = dict(max_batch_size=8, max_input_len=64, max_seq_len=128, max_num_tokens=256)
KV = KvCacheConfig(max_tokens=4096, tokens_per_block=16)


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(checkpoint, kv_cache_config=KV, seed=1, **LIMITS) as llm:
        yield llm


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return load_hf_model(checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(checkpoint):
    return AutoTokenizer.from_pretrained(checkpoint)


def greedy_text(llm, prompt, max_tokens=16):
    return llm.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), use_tqdm=False)


def test_generate_text_prompt_matches_hf(llm, hf_model, hf_tokenizer):
    prompt = "Hello world, 你好 😀"
    out = greedy_text(llm, prompt, max_tokens=12)
    prompt_ids = hf_tokenizer(prompt).input_ids
    assert isinstance(out, rtllm.RequestOutput) and out.finished
    assert out.prompt == prompt and out.prompt_token_ids == prompt_ids
    (completion,) = out.outputs
    assert completion.token_ids == hf_greedy(hf_model, prompt_ids, 12)
    assert completion.text == hf_tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert completion.finish_reason == "length" and completion.stop_reason is None
    assert completion.logprobs is None and completion.cumulative_logprob is None


def test_generate_list_of_mixed_prompts(llm, hf_tokenizer):
    ids = hf_tokenizer("The quick brown fox").input_ids
    prompts = ["The quick brown fox", ids, {"prompt": "The quick brown fox"}, {"prompt_token_ids": ids},
               [5, 6, 7]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, **GREEDY), use_tqdm=False)
    assert isinstance(outs, list) and len(outs) == len(prompts)
    assert len({o.request_id for o in outs}) == len(prompts)
    assert all(o.prompt_token_ids == ids for o in outs[:4])
    assert outs[0].prompt == "The quick brown fox" and outs[1].prompt is None
    reference = greedy_text(llm, ids, 8).outputs[0].token_ids
    assert all(o.outputs[0].token_ids == reference for o in outs[:4])
    assert outs[4].outputs[0].token_ids == greedy_text(llm, [5, 6, 7], 8).outputs[0].token_ids


def test_sampling_params_per_prompt(llm):
    outs = llm.generate(["a b", "c d"], [SamplingParams(max_tokens=3, **GREEDY),
                                         SamplingParams(max_tokens=5, **GREEDY)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 5]
    with pytest.raises(ValueError, match="2 prompts"):
        llm.generate(["a", "b"], [SamplingParams()], use_tqdm=False)


def test_streaming_concatenates_to_final_text(llm):
    params = SamplingParams(max_tokens=20, **GREEDY)
    expected = greedy_text(llm, "Café naïve", 20).outputs[0]
    parts = list(llm.generate_async("Café naïve", params, streaming=True))
    assert len(parts) >= 2
    assert all(not p.finished for p in parts[:-1]) and parts[-1].finished
    assert "".join(p.outputs[0].text_diff for p in parts) == expected.text == parts[-1].outputs[0].text
    assert sum((p.outputs[0].token_ids_diff for p in parts), []) == expected.token_ids
    for earlier, later in zip(parts, parts[1:]):  # snapshots are cumulative and never shrink
        assert later.outputs[0].text.startswith(earlier.outputs[0].text)


def test_generate_async_await_and_async_for(llm):
    params = SamplingParams(max_tokens=10, **GREEDY)
    prompts = ["one", "two two", "three three three"]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def main():
        finals = await asyncio.gather(*(llm.generate_async(p, params) for p in prompts))
        streamed = []
        for p in prompts:
            text = ""
            async for part in llm.generate_async(p, params, streaming=True):
                text += part.outputs[0].text_diff
            streamed.append(text)
        result = await llm.generate_async(prompts[0], params).aresult()
        return [f.outputs[0].text for f in finals], streamed, result

    finals, streamed, result = asyncio.run(main())
    assert finals == expected and streamed == expected and result.outputs[0].text == expected[0]
    assert llm.generate_async(prompts[1], params).result().outputs[0].text == expected[1]


def test_async_streams_wake_their_loop_once_per_batch(llm):
    # Each batch of responses the executor routes wakes an event loop once, however many of its
    # streams it advances (a self-pipe write per token per stream cost more than the routing).
    params = SamplingParams(max_tokens=10, **GREEDY)
    prompts = [f"stream {i} of eight" for i in range(8)]
    expected = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def main():
        loop = asyncio.get_running_loop()
        wakeups, original = [], loop.call_soon_threadsafe

        def counting(callback, *args, **kwargs):
            wakeups.append(callback)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counting

        async def stream(prompt):
            parts = [part async for part in llm.generate_async(prompt, params, streaming=True)]
            return "".join(p.outputs[0].text_diff for p in parts), len(parts)

        results = await asyncio.gather(*(stream(p) for p in prompts))
        return results, len(wakeups)

    results, num_wakeups = asyncio.run(main())
    assert [text for text, _ in results] == expected
    num_parts = sum(n for _, n in results)
    assert num_parts >= 8 * 10
    assert num_wakeups <= num_parts // 2, (num_wakeups, num_parts)


def test_n_samples_use_seeds_hashed_from_seed_and_index(llm):
    """Sample 0 is the seed's own sample; sample i > 0 is no other request's (seed + i was)."""
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, n=3, ignore_eos=True)
    out = llm.generate("Sample me", params, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for i, completion in enumerate(out.outputs):
        single = llm.generate("Sample me", SamplingParams(max_tokens=12, temperature=1.0, seed=5 + i,
                                                          ignore_eos=True), use_tqdm=False)
        assert (completion.token_ids == single.outputs[0].token_ids) == (i == 0)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # 300-way sampling, 12 steps
    again = llm.generate("Sample me", params, use_tqdm=False)
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_concurrent_callers_from_threads(llm):
    prompts = [f"thread {i} says" for i in range(6)]
    params = SamplingParams(max_tokens=10, **GREEDY)
    expected = [greedy_text(llm, p, 10).outputs[0].token_ids for p in prompts]
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        got = list(pool.map(lambda p: llm.generate(p, params, use_tqdm=False).outputs[0].token_ids,
                            prompts))
    assert got == expected


def _stop_string_of(text):
    # A 2-char stop string from the middle of `text`, taken at its first occurrence.
    for start in range(len(text) // 3, len(text) - 1):
        s = text[start:start + 2]
        if s.strip() and "\ufffd" not in s and text.find(s) == start:
            return start, s
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("streaming", [False, True])
def test_stop_string(llm, hf_tokenizer, include, streaming):
    full = greedy_text(llm, "Stop here", 40).outputs[0]
    start, stop = _stop_string_of(full.text)
    params = SamplingParams(max_tokens=40, stop=["NEVER-SEEN", stop], include_stop_str_in_output=include,
                            **GREEDY)
    result = llm.generate_async("Stop here", params, streaming=streaming)
    parts = list(result)
    out = parts[-1].outputs[0]
    assert out.text == full.text[:start + (len(stop) if include else 0)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert "".join(p.outputs[0].text_diff for p in parts) == out.text
    # Generation ended at the first token whose text is complete (not ending inside a UTF-8
    # character, which decodes to U+FFFD) and holds the stop string.
    texts = [hf_tokenizer.decode(full.token_ids[:n], skip_special_tokens=True)
             for n in range(len(full.token_ids) + 1)]
    num_tokens = next(n for n, t in enumerate(texts) if stop in t and not t.endswith("\ufffd"))
    assert out.token_ids == full.token_ids[:num_tokens]


def test_stop_token_ids_and_end_id(llm):
    full = greedy_text(llm, "Stop ids", 20).outputs[0].token_ids
    k = next(i for i in range(3, len(full)) if full[i] not in full[:i])
    out = llm.generate("Stop ids", SamplingParams(max_tokens=20, stop_token_ids=[full[k]], **GREEDY),
                       use_tqdm=False).outputs[0]
    assert out.token_ids == full[:k + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", full[k])
    out = llm.generate("Stop ids", SamplingParams(max_tokens=20, temperature=0.0, end_id=full[k]),
                       use_tqdm=False).outputs[0]
    assert out.token_ids == full[:k + 1] and (out.finish_reason, out.stop_reason) == ("stop", None)
    out = llm.generate("Stop ids", SamplingParams(max_tokens=20, min_tokens=k + 2, temperature=0.0,
                                                  end_id=full[k]), use_tqdm=False).outputs[0]
    assert len(out.token_ids) > k + 1


def test_logprobs_match_hf(llm, hf_model, hf_tokenizer):
    prompt_ids = hf_tokenizer("Log probs").input_ids
    out = llm.generate(prompt_ids, SamplingParams(max_tokens=4, logprobs=3, **GREEDY),
                       use_tqdm=False).outputs[0]
    logits = hf_last_logits(hf_model, prompt_ids)
    log_softmax = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    first = out.logprobs[0]
    top3 = np.argsort(-log_softmax)[:3]
    assert set(first) == set(int(t) for t in top3) and out.token_ids[0] == int(top3[0])
    for t in top3:
        assert first[int(t)] == pytest.approx(log_softmax[t], abs=1e-3)
    assert out.cumulative_logprob == pytest.approx(sum(d[t] for d, t in zip(out.logprobs, out.token_ids)))
    zero = llm.generate(prompt_ids, SamplingParams(max_tokens=4, logprobs=0, **GREEDY),
                        use_tqdm=False).outputs[0]
    assert zero.logprobs == pytest.approx([d[t] for d, t in zip(out.logprobs, out.token_ids)], abs=1e-5)


def test_abort(tiny_model):
    # Requests of 16,000 tokens (seconds of work even for this tiny model) so the abort lands well
    # before they could finish on their own, however loaded the machine.
    long_checkpoint = str(tiny_model("llama", max_position_embeddings=16384))
    with LLM(long_checkpoint, kv_cache_config=KvCacheConfig(max_tokens=16384, tokens_per_block=16),
             max_seq_len=16384, max_input_len=32, max_num_tokens=256) as llm:
        params = SamplingParams(max_tokens=16000, **GREEDY)
        parts = []
        for part in llm.generate_async("Abort me", params, streaming=True):
            parts.append(part)
            if len(parts) == 1:
                part.abort()
        out = parts[-1].outputs[0]
        assert parts[-1].finished and out.finish_reason == "cancelled" and len(out.token_ids) < 16000
        result = llm.generate_async("Abort me too", params, streaming=True)
        next(iter(result))
        llm.abort(result.request_id)
        assert result.result().outputs[0].finish_reason == "cancelled"
        llm.abort(result.request_id)  # finished: a no-op
        with pytest.raises(ValueError, match="request_id"):
            llm.abort(10**9)
        unseen = llm.generate_async("Abort before any token", params)
        unseen.abort()
        assert unseen.result().outputs[0].finish_reason == "cancelled"
        # Every cancelled request gave its KV blocks back.
        assert llm.get_stats()["kv_cache"]["num_used_blocks"] == 0


BAD_INPUTS = [
    ("", "empty"), ([], "empty"), ({"prompt_token_ids": []}, "empty"), ([-1], "-1"), ([300], "300"),
    ([2] * 65, "max_input_len=64"), ([1.5], "1.5"), (3.5, "float"), (None, "NoneType"),
    ({"text": "hi"}, "prompt_token_ids"), ([[3], ""], "empty"),
]


@pytest.mark.parametrize("bad,message", BAD_INPUTS)
def test_bad_input_raises_value_error(llm, bad, message):
    with pytest.raises(ValueError, match=message):
        llm.generate(bad, use_tqdm=False)


def test_bad_inputs_keep_engine_serving(llm):
    before = greedy_text(llm, "still alive", 8).outputs[0].token_ids
    for bad, _ in BAD_INPUTS:
        with pytest.raises(ValueError):
            llm.generate(bad, use_tqdm=False)
    with pytest.raises(ValueError, match="SamplingParams"):
        llm.generate("x", sampling_params={"max_tokens": 3}, use_tqdm=False)
    assert greedy_text(llm, "still alive", 8).outputs[0].token_ids == before


def test_max_tokens_clamped_to_max_seq_len(llm):
    out = llm.generate([3] * 60, SamplingParams(max_tokens=500, **GREEDY), use_tqdm=False).outputs[0]
    assert len(out.token_ids) == LIMITS["max_seq_len"] - 60 and out.finish_reason == "length"


def test_get_stats(llm):
    before = llm.get_stats()
    greedy_text(llm, "count me", 5)
    after = llm.get_stats()
    assert after["num_completed_requests"] == before["num_completed_requests"] + 1
    assert after["num_generated_tokens"] == before["num_generated_tokens"] + 5
    assert after["kv_cache"]["tokens_per_block"] == 16
    assert after["kv_cache"]["num_total_blocks"] == 4096 // 16


def test_chat_template_prompt(llm, hf_tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = llm.tokenizer.apply_chat_template(messages, tokenize=True)
    assert ids == hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                   return_dict=False)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert out.prompt_token_ids == ids


def test_engine_dir_and_context_manager(checkpoint, tmp_path, llm):
    engine_dir = str(tmp_path / "engine")
    model = AutoModelForCausalLM.from_hugging_face(checkpoint)
    rtllm.build(model, BuildConfig(**LIMITS)).save(engine_dir)
    expected = greedy_text(llm, "round trip", 10).outputs[0]
    with LLM(engine_dir, kv_cache_config=KV) as engine_llm:
        out = greedy_text(engine_llm, "round trip", 10).outputs[0]
        pending = engine_llm.generate_async("pending", SamplingParams(max_tokens=120, **GREEDY))
    assert (out.token_ids, out.text) == (expected.token_ids, expected.text)
    assert pending.result().outputs[0].finish_reason in ("cancelled", "length")
    with pytest.raises(RuntimeError, match="shut down"):
        engine_llm.generate("after", use_tqdm=False)
    engine_llm.shutdown()  # idempotent
    with pytest.raises(ValueError, match="build_config"):
        LLM(engine_dir, build_config=BuildConfig())


def test_shutdown_and_with_block_give_the_runner_back(checkpoint):
    """The model runner (on CUDA: weights, KV pool, workspace) goes at shutdown() or at the end of a
    `with` block, while the LLM object is still referenced, not when it is garbage-collected."""
    gc.collect()  # LLMs other tests dropped go now, not in the middle of the counts below
    before = _core.Executor.num_live_runners()
    with LLM(checkpoint, kv_cache_config=KV, **LIMITS) as llm:
        assert _core.Executor.num_live_runners() == before + 1
        out = llm.generate("x", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    assert _core.Executor.num_live_runners() == before
    assert llm.get_stats()["num_completed_requests"] == 1
    llm = LLM(checkpoint, kv_cache_config=KV, **LIMITS)
    assert _core.Executor.num_live_runners() == before + 1
    again = llm.generate("x", SamplingParams(max_tokens=3, **GREEDY), use_tqdm=False)
    llm.shutdown()
    assert _core.Executor.num_live_runners() == before
    assert again.outputs[0].token_ids == out.outputs[0].token_ids


def test_dropped_llm_stops_its_executor(checkpoint):
    # An HF checkpoint is built in memory: there is no engine directory to delete.
    llm = LLM(checkpoint, kv_cache_config=KV, **LIMITS)
    assert llm.engine_dir is None
    thread = llm._executor._thread
    llm.generate("x", SamplingParams(max_tokens=2), use_tqdm=False)
    del llm
    gc.collect()
    assert not thread.is_alive()


def test_skip_tokenizer_init(checkpoint):
    with LLM(checkpoint, skip_tokenizer_init=True, kv_cache_config=KV, **LIMITS) as llm:
        out = llm.generate([5, 6, 7], SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].text == ""
        with pytest.raises(ValueError, match="tokenizer"):
            llm.generate("text", use_tqdm=False)
        with pytest.raises(ValueError, match="stop"):
            llm.generate([5], SamplingParams(stop="x"), use_tqdm=False)


def test_bad_llm_arguments(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="device='tpu'"):
        LLM(checkpoint, device="tpu")
    with pytest.raises(ValueError, match="max_batch_size=0"):
        LLM(checkpoint, max_batch_size=0)
    with pytest.raises(ValueError, match="free_gpu_memory_fraction"):
        KvCacheConfig(free_gpu_memory_fraction=1.5)


def test_forgotten_llm_does_not_hang_exit(checkpoint):
    # Neither shutdown() nor a finished request: the interpreter must still exit promptly.
    script = (f"from rtllm import LLM, SamplingParams, KvCacheConfig\n"
              f"llm = LLM({checkpoint!r}, kv_cache_config=KvCacheConfig(max_tokens=1024), "
              f"max_seq_len=128, max_input_len=64, max_num_tokens=256)\n"
              f"llm.generate_async('never waited for', SamplingParams(max_tokens=100, ignore_eos=True))\n"
              f"print('submitted')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "submitted\n"
