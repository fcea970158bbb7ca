"""Prefix reuse through the LLM API and the core executor on a tiny random-weight Llama: a request
sharing a cached prefix computes only its uncached tokens (and still matches HF transformers), KV
cache events describe the stored and evicted blocks, and cache salts keep requests apart."""
import numpy as np
import pytest

import rtllm
from rtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams
from rtllm import _core
from rtllm.models import AutoModelForCausalLM

from hf_reference import hf_greedy, load_hf_model, random_prompts

GREEDY = dict(temperature=0.0, ignore_eos=True)
LIMITS = dict(max_batch_size=4, max_input_len=96, max_seq_len=128, max_num_tokens=128)
TOKENS_PER_BLOCK = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("reuse-engine"))
    rtllm.build(AutoModelForCausalLM.from_hugging_face(checkpoint), BuildConfig(**LIMITS)).save(path)
    return path


@pytest.fixture(scope="module")
def hf_model(checkpoint):
    return load_hf_model(checkpoint)


def greedy(llm, prompt, max_tokens=6):
    return llm.generate(list(prompt), SamplingParams(max_tokens=max_tokens, **GREEDY),
                        use_tqdm=False).outputs[0].token_ids


def test_shared_prefix_computes_only_uncached_tokens(engine_dir, hf_model):
    rng = np.random.default_rng(3)
    system = random_prompts(rng, [43])[0]  # 5 full blocks + 3 tokens
    first, second = (system + tail for tail in random_prompts(rng, [6, 11]))
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        assert greedy(llm, first) == hf_greedy(hf_model, first, 6)
        before = llm.get_stats()
        assert before["num_context_tokens"] == len(first)
        assert greedy(llm, second) == hf_greedy(hf_model, second, 6)
        after = llm.get_stats()
    reused = after["kv_cache"]["num_reused_tokens"] - before["kv_cache"]["num_reused_tokens"]
    assert reused == 40  # the 5 full blocks of the shared prefix
    assert after["num_context_tokens"] - before["num_context_tokens"] == len(second) - 40
    assert after["kv_cache"]["num_reused_blocks"] == 5
    # The first request looked up 6 full blocks (48 of its 49 prompt tokens) and found none.
    assert after["kv_cache"]["num_missed_blocks"] >= 6
    assert after["kv_cache"]["hit_rate"] == pytest.approx(5 / (5 + after["kv_cache"]["num_missed_blocks"]))


def test_identical_prompt_reuses_all_but_the_last_token(engine_dir, hf_model):
    prompt = random_prompts(np.random.default_rng(4), [32])[0]  # exactly 4 blocks
    with LLM(engine_dir, kv_cache_config=KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK)) as llm:
        expected = greedy(llm, prompt)
        before = llm.get_stats()
        assert greedy(llm, prompt) == expected == hf_greedy(hf_model, prompt, 6)
        after = llm.get_stats()
    # 31 tokens may be reused, in whole blocks: 3 blocks; the 4th block's 8 tokens are computed.
    assert after["kv_cache"]["num_reused_tokens"] - before["kv_cache"]["num_reused_tokens"] == 24
    assert after["num_context_tokens"] - before["num_context_tokens"] == 8


def test_kv_cache_events(engine_dir):
    rng = np.random.default_rng(5)
    prompt = random_prompts(rng, [20])[0]
    # 16 blocks: one sequence of max_seq_len, so later requests must evict the cached blocks.
    kv = KvCacheConfig(max_tokens=128, tokens_per_block=TOKENS_PER_BLOCK, event_buffer_max_size=1000)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        out = greedy(llm, prompt, max_tokens=5)
        events = llm.get_kv_cache_events()
        assert llm.get_kv_cache_events() == []  # drained
        for p in random_prompts(rng, [90, 90]):
            greedy(llm, p, max_tokens=2)
        later = llm.get_kv_cache_events()
    assert events[0] == {"event_id": 0, "type": "created", "num_blocks": 16, "tokens_per_block": 8}
    tokens = prompt + out
    stored = [e for e in events if e["type"] == "stored"]
    # 20 prompt + 5 generated tokens; the last one is never fed: 24 computed = 3 full blocks.
    assert [e["token_offset"] for e in stored] == [0, 8, 16]
    for e in stored:
        assert e["token_ids"] == tokens[e["token_offset"]:e["token_offset"] + 8]
    assert [e["parent_hash"] for e in stored] == [0] + [e["block_hash"] for e in stored[:-1]]
    removed = [e for e in later if e["type"] == "removed"]
    assert {e["block_hash"] for e in stored} <= {e["block_hash"] for e in removed}
    assert [e["event_id"] for e in later] == sorted(e["event_id"] for e in later)


def run_core(executor, prompt, cache_salt=None):
    request = _core.Request(prompt, sampling=_core.SamplingConfig(temperature=0.0),
                            stop=_core.StopConfig(max_tokens=4, ignore_eos=True), cache_salt=cache_salt)
    request_id = executor.enqueue(request)
    while True:
        for response in executor.await_responses(1000):
            assert response.request_id == request_id
            if response.is_final:
                return response.token_ids


def test_cache_salt_keeps_requests_apart(engine_dir):
    prompt = random_prompts(np.random.default_rng(6), [33])[0]
    engine = _core.Engine.load(engine_dir)
    kv = _core.KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK)
    executor = _core.Executor(engine, _core.ExecutorConfig(kv_cache=kv))
    try:
        reused = lambda: executor.get_stats().kv_cache.num_reused_tokens
        expected = run_core(executor, prompt, cache_salt="alice")
        assert reused() == 0
        assert run_core(executor, prompt, cache_salt="bob") == expected
        assert reused() == 0
        assert run_core(executor, prompt) == expected  # no salt: shares only with unsalted requests
        assert reused() == 0
        assert run_core(executor, prompt, cache_salt="alice") == expected
        assert reused() == 32
    finally:
        executor.shutdown()


def test_cache_salt_through_the_llm_api(engine_dir, hf_model):
    prompt = random_prompts(np.random.default_rng(9), [33])[0]  # 4 full blocks + 1 token
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK)
    params = SamplingParams(max_tokens=4, **GREEDY)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        def reused_tokens_of(**kwargs):
            before = llm.get_stats()["kv_cache"]["num_reused_tokens"]
            out = llm.generate(list(prompt), params, use_tqdm=False, **kwargs).outputs[0].token_ids
            assert out == hf_greedy(hf_model, prompt, 4)
            return llm.get_stats()["kv_cache"]["num_reused_tokens"] - before

        assert reused_tokens_of(cache_salt="alice") == 0
        assert reused_tokens_of(cache_salt="bob") == 0  # another salt: nothing shared
        assert reused_tokens_of(cache_salt="alice") == 32
        assert reused_tokens_of() == 0  # unsalted requests do not see salted blocks
        result = llm.generate_async(list(prompt), params, cache_salt="bob")
        assert result.result().outputs[0].token_ids == hf_greedy(hf_model, prompt, 4)
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate([list(prompt)] * 2, params, use_tqdm=False, cache_salt=["a"])
