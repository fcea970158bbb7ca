"""Prefix reuse through the LLM API and the core executor on a tiny random-weight Llama: a request
sharing a cached prefix computes only its uncached tokens (and still matches HF transformers),
including the leading tokens of a partially shared block (copied, copy-on-write), KV cache events
describe the stored and evicted blocks, and cache salts keep requests apart."""
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
    assert first[43] != second[43]
    # Full blocks only: the 3 tokens of the shared prefix in block 5 are computed again.
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK, enable_partial_reuse=False)
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
    assert after["kv_cache"]["num_partial_reused_blocks"] == 0


def reused_tokens(llm, hf_model, prompt, sequences):
    """Runs prompt (checked against HF), appends its tokens to `sequences`, returns stat deltas."""
    before = llm.get_stats()
    out = greedy(llm, prompt)
    assert out == hf_greedy(hf_model, prompt, 6)
    sequences.append(prompt + out)
    after = llm.get_stats()
    return {key: after["kv_cache"][key] - before["kv_cache"][key]
            for key in ("num_reused_tokens", "num_reused_blocks", "num_partial_reused_blocks")} | {
                "num_context_tokens": after["num_context_tokens"] - before["num_context_tokens"]}


@pytest.mark.parametrize("tokens_per_block", [4, 8, 16])
def test_prefix_ending_mid_block_is_partially_reused(engine_dir, hf_model, tokens_per_block):
    """A 43-token shared prefix: its full blocks are shared, and the leading tokens of the cached
    block it ends in are copied into the second request's private block (at most tokens_per_block - 1:
    a whole equal block would have been shared), so it computes only what follows them."""
    rng = np.random.default_rng(10 + tokens_per_block)
    system = random_prompts(rng, [43])[0]
    first, second = (system + tail for tail in random_prompts(rng, [6, 11]))
    assert first[43] != second[43]
    third = second[:-1] + [second[-1] % 100 + 2]  # the second's prompt with another last token
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=tokens_per_block, event_buffer_max_size=1000)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        sequences = []
        reused_tokens(llm, hf_model, first, sequences)
        second_reuse = reused_tokens(llm, hf_model, second, sequences)
        # The third reuses the second's private block, registered once full with the second's tokens.
        third_reuse = reused_tokens(llm, hf_model, third, sequences)
        events = llm.get_kv_cache_events()
    num_full = 43 // tokens_per_block * tokens_per_block
    # The first left its computed tokens (prompt + 5 fed back) cached in full blocks, among them
    # the block the shared prefix ends in.
    assert (len(first) + 5) // tokens_per_block * tokens_per_block > num_full
    assert second_reuse == {"num_reused_tokens": 43, "num_reused_blocks": num_full // tokens_per_block,
                            "num_partial_reused_blocks": 1, "num_context_tokens": len(second) - 43}
    # The second's cached full blocks; the third may take whole blocks of its first 53 tokens, then
    # the leading tokens of the next cached block, never its last token.
    num_blocks_second = (len(second) + 5) // tokens_per_block
    num_blocks_third = min(53 // tokens_per_block, num_blocks_second)
    num_partial = min(tokens_per_block - 1, 53 - num_blocks_third * tokens_per_block)
    if num_blocks_third == num_blocks_second:
        num_partial = 0
    assert third_reuse["num_reused_tokens"] == num_blocks_third * tokens_per_block + num_partial
    assert third_reuse["num_context_tokens"] == len(third) - third_reuse["num_reused_tokens"]
    stored = [e for e in events if e["type"] == "stored"]
    assert len({e["block_hash"] for e in stored}) == len(stored)
    for e in stored:  # every stored block carries the tokens of a request at its offset
        span = slice(e["token_offset"], e["token_offset"] + tokens_per_block)
        assert any(e["token_ids"] == s[span] for s in sequences)


def test_partial_reuse_up_to_the_last_token(engine_dir, hf_model):
    """The same 30-token prompt twice: 3 full blocks and 5 of the 6 cached tokens of the fourth
    block are reused; only the last prompt token is computed."""
    prompt = random_prompts(np.random.default_rng(11), [30])[0]
    with LLM(engine_dir, kv_cache_config=KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK)) as llm:
        expected = greedy(llm, prompt)  # 30 + 5 computed tokens: 4 full blocks cached
        before = llm.get_stats()
        assert greedy(llm, prompt) == expected == hf_greedy(hf_model, prompt, 6)
        after = llm.get_stats()
    assert after["kv_cache"]["num_reused_tokens"] - before["kv_cache"]["num_reused_tokens"] == 29
    assert after["num_context_tokens"] - before["num_context_tokens"] == 1


def test_min_partial_reuse_tokens(engine_dir, hf_model):
    prompt = random_prompts(np.random.default_rng(12), [30])[0]
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK, min_partial_reuse_tokens=6)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        greedy(llm, prompt)
        before = llm.get_stats()
        assert greedy(llm, prompt) == hf_greedy(hf_model, prompt, 6)
        after = llm.get_stats()
    # 5 shared tokens in the fourth block are below the threshold: only the 3 full blocks are reused.
    assert after["kv_cache"]["num_reused_tokens"] - before["kv_cache"]["num_reused_tokens"] == 24
    assert after["kv_cache"]["num_partial_reused_blocks"] == 0
    with pytest.raises(ValueError, match="min_partial_reuse_tokens"):
        KvCacheConfig(min_partial_reuse_tokens=0)


@pytest.mark.parametrize("partial", [False, True])
def test_identical_prompt_reuses_all_but_the_last_token(engine_dir, hf_model, partial):
    prompt = random_prompts(np.random.default_rng(4), [32])[0]  # exactly 4 blocks
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=TOKENS_PER_BLOCK, enable_partial_reuse=partial)
    with LLM(engine_dir, kv_cache_config=kv) as llm:
        expected = greedy(llm, prompt)
        before = llm.get_stats()
        assert greedy(llm, prompt) == expected == hf_greedy(hf_model, prompt, 6)
        after = llm.get_stats()
    # 31 tokens may be reused: 3 whole blocks, and with partial reuse 7 tokens of the 4th; the rest
    # of the 4th block (8 tokens, or only the last one) is computed.
    num_reused = 31 if partial else 24
    assert after["kv_cache"]["num_reused_tokens"] - before["kv_cache"]["num_reused_tokens"] == num_reused
    assert after["num_context_tokens"] - before["num_context_tokens"] == 32 - num_reused


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


def test_runner_copy_blocks_copies_every_layer(tmp_path):
    """ModelRunner.copy_blocks against the float64 reference: a sequence sharing 6 tokens (one full
    block and 2 tokens of the next) with a cached one reads its own copy of the partial block; the
    source keeps serving its owner."""
    from engine_fixture import TinyModel, reference_logits, write_engine

    m = TinyModel(num_layers=3)
    engine = _core.Engine.load(str(write_engine(tmp_path / "engine", m)))
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(tokens_per_block=4, num_kv_blocks=16))
    rng = np.random.default_rng(13)
    a = [int(t) for t in rng.integers(0, m.vocab_size, 10)]
    b = a[:6] + [int(t) for t in rng.integers(0, m.vocab_size, 5)]
    table = lambda *ids: np.array([ids], dtype=np.int32)
    error = lambda x, ref: float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))
    runner.forward(a, [10], [0], table(3, 7, 11))
    runner.copy_blocks([(7, 5)])  # b's block 1 starts as a's: tokens 4, 5 are b's too
    out = runner.forward(b[6:], [5], [6], table(3, 5, 9))
    assert error(out[0], reference_logits(m, b)[-1]) <= 1e-5
    # The same step over a block nobody copied into reads other K/V: the check above can fail.
    stale = runner.forward(b[6:], [5], [6], table(3, 13, 9))
    assert not np.all(np.isfinite(stale)) or error(stale[0], reference_logits(m, b)[-1]) > 1e-3
    # b wrote its tokens 6, 7 into its copy, never into a's block 7.
    out = runner.forward([a[-1]], [1], [10], table(3, 7, 11))
    assert error(out[0], reference_logits(m, a + [a[-1]])[-1]) <= 1e-5
    with pytest.raises(ValueError, match="outside"):
        runner.copy_blocks([(16, 0)])
    with pytest.raises(ValueError, match="onto itself"):
        runner.copy_blocks([(2, 2)])
