"""_core.Executor end to end on a hand-written engine whose next-token logits depend only on the
last token: logits = lm_head @ embed[last]. The reference is that formula in float64 numpy, so
every greedy sequence, stop, length cap and logprob has an exact expected value.
"""
import gc
import json
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import save_file

from rtllm import _core

from engine_fixture import engine_config

VOCAB, HIDDEN = 40, 16
LIMITS = dict(max_batch_size=4, max_input_len=24, max_seq_len=48, max_num_tokens=64)


def write_markov_engine(path, seed=0, limits=LIMITS):
    """Writes an engine (format version 1): embedding -> gather_rows(last tokens) -> linear."""
    rng = np.random.default_rng(seed)
    embed = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    lm_head = (2.0 * rng.standard_normal((VOCAB, HIDDEN))).astype(np.float32)
    save_file({"embed.weight": embed, "lm_head.weight": lm_head}, str(path / "rank0.engine"))
    spec = lambda name, *shape: {"name": name, "dtype": "float32", "shape": list(shape)}
    tensors = [spec("hidden", "num_tokens", HIDDEN), spec("last_hidden", "num_seqs", HIDDEN),
               spec("logits", "num_seqs", VOCAB)]
    nodes = [
        {"op": "embedding", "inputs": ["input_ids", "embed.weight"], "outputs": ["hidden"], "attrs": {}},
        {"op": "gather_rows", "inputs": ["hidden", "last_token_ids"], "outputs": ["last_hidden"], "attrs": {}},
        {"op": "linear", "inputs": ["last_hidden", "lm_head.weight"], "outputs": ["logits"], "attrs": {}},
    ]
    model_config = {"architecture": "MarkovForTest", "vocab_size": VOCAB, "hidden_size": HIDDEN,
                    "num_layers": 1, "num_heads": 1, "num_kv_heads": 1, "head_dim": HIDDEN,
                    "intermediate_size": 0, "max_position_embeddings": 64, "dtype": "float32",
                    "bos_token_id": -1, "eos_token_id": []}
    config = engine_config(model_config, limits, tensors, nodes)
    (path / "config.json").write_text(json.dumps(config))
    return embed.astype(np.float64) @ lm_head.astype(np.float64).T  # [VOCAB, VOCAB]: row t = logits after t


@pytest.fixture(scope="module")
def markov(tmp_path_factory):
    path = tmp_path_factory.mktemp("markov_engine")
    next_logits = write_markov_engine(path)
    return _core.Engine.load(str(path)), next_logits


LONG_SEQ_LEN = 200_000


@pytest.fixture(scope="module")
def long_markov(tmp_path_factory):
    """The same model with room for sequences long enough to be still running when cancelled."""
    path = tmp_path_factory.mktemp("long_markov_engine")
    write_markov_engine(path, limits=dict(LIMITS, max_seq_len=LONG_SEQ_LEN))
    return _core.Engine.load(str(path))


def make_executor(engine, max_kv_tokens=None, tokens_per_block=4, seed=0, **runtime):
    kv = _core.KvCacheConfig(max_tokens=max_kv_tokens, tokens_per_block=tokens_per_block)
    return _core.Executor(engine, _core.ExecutorConfig(runtime=_core.RuntimeConfig(**runtime), kv_cache=kv, seed=seed))


def greedy_reference(next_logits, prompt, num_tokens, masked_until=0, masked=()):
    """Greedy chain; ids in `masked` may not be drawn while fewer than masked_until were generated."""
    out, last = [], prompt[-1]
    for i in range(num_tokens):
        logits = next_logits[last].copy()
        if i < masked_until:
            logits[list(masked)] = -np.inf
        last = int(np.argmax(logits))
        out.append(last)
    return out


def collect(executor, ids, timeout_s=30.0):
    """Responses per request id until every one has its final response."""
    got = {i: [] for i in ids}
    deadline = time.time() + timeout_s
    while not all(got[i] and got[i][-1].is_final for i in ids):
        assert time.time() < deadline, "timed out waiting for responses"
        for r in executor.await_responses(100):
            assert r.request_id in got, f"response for unexpected request {r.request_id}"
            assert not (got[r.request_id] and got[r.request_id][-1].is_final), "response after the final one"
            got[r.request_id].append(r)
    return got


def greedy_request(prompt, max_tokens, streaming=False, **stop):
    return _core.Request(prompt, sampling=_core.SamplingConfig(temperature=0.0),
                         stop=_core.StopConfig(max_tokens=max_tokens, **stop), streaming=streaming)


PROMPTS = [[3, 7, 1], [5], [12, 30, 2, 9, 9, 4, 0, 21, 33, 8], [39, 38], [1, 2, 3, 4], [6] * 20]


def test_greedy_batch_matches_reference_and_frees_blocks(markov):
    engine, next_logits = markov
    with_limits = make_executor(engine)
    ids = [with_limits.enqueue(greedy_request(p, 5 + i)) for i, p in enumerate(PROMPTS)]  # more than max_batch_size
    got = collect(with_limits, ids)
    for i, (rid, prompt) in enumerate(zip(ids, PROMPTS)):
        [response] = got[rid]
        assert response.finish_reason == _core.FinishReason.LENGTH
        assert list(response.token_ids) == greedy_reference(next_logits, prompt, 5 + i)
    stats = with_limits.get_stats()
    assert stats.num_completed_requests == len(PROMPTS)
    assert stats.num_generated_tokens == sum(5 + i for i in range(len(PROMPTS)))
    assert stats.num_active_requests == 0 and stats.num_waiting_requests == 0
    assert stats.kv_cache.num_free_blocks == stats.kv_cache.num_total_blocks
    assert stats.kv_cache.num_total_blocks == LIMITS["max_batch_size"] * LIMITS["max_seq_len"] // 4
    with_limits.shutdown()


def test_small_kv_pool_runs_requests_one_by_one(markov):
    engine, next_logits = markov
    executor = make_executor(engine, max_kv_tokens=LIMITS["max_seq_len"])  # room for one full request
    ids = [executor.enqueue(greedy_request(p, 30)) for p in PROMPTS[:4]]
    got = collect(executor, ids)
    for rid, prompt in zip(ids, PROMPTS[:4]):
        assert list(got[rid][0].token_ids) == greedy_reference(next_logits, prompt, 30)
    assert executor.get_stats().kv_cache.num_used_blocks == 0


def test_max_seq_len_caps_generation(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    prompt = PROMPTS[5]  # 20 tokens
    [response] = collect(executor, [rid := executor.enqueue(greedy_request(prompt, 1000))])[rid]
    assert response.finish_reason == _core.FinishReason.LENGTH
    assert len(response.token_ids) == LIMITS["max_seq_len"] - len(prompt)
    assert list(response.token_ids) == greedy_reference(next_logits, prompt, len(response.token_ids))


def test_end_and_stop_ids_min_tokens_and_ignore_eos(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    prompt = [3, 7, 1]
    chain = greedy_reference(next_logits, prompt, 20)
    end = chain[2]
    first = chain.index(end)

    def run(**stop):
        rid = executor.enqueue(greedy_request(prompt, 20, **stop))
        return collect(executor, [rid])[rid][-1]

    r = run(end_ids=[end])
    assert r.finish_reason == _core.FinishReason.END_ID and r.stop_token_id == end
    assert list(r.token_ids) == chain[:first + 1]  # the end id is the last token

    r = run(stop_token_ids=[end])
    assert r.finish_reason == _core.FinishReason.STOP_TOKEN_ID and r.stop_token_id == end
    assert list(r.token_ids) == chain[:first + 1]

    r = run(end_ids=[end], ignore_eos=True)  # never stops on it, never masks it
    assert r.finish_reason == _core.FinishReason.LENGTH and list(r.token_ids) == chain

    min_tokens = first + 3
    r = run(end_ids=[end], min_tokens=min_tokens)
    masked = greedy_reference(next_logits, prompt, 20, masked_until=min_tokens, masked=[end])
    assert end not in masked[:min_tokens]
    expected = masked[:masked.index(end, min_tokens) + 1] if end in masked[min_tokens:] else masked
    assert list(r.token_ids) == expected


def test_streaming_sends_each_token_once(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    ids = [executor.enqueue(greedy_request(p, 9, streaming=True)) for p in PROMPTS[:3]]
    got = collect(executor, ids)
    for rid, prompt in zip(ids, PROMPTS[:3]):
        responses = got[rid]
        assert all(len(r.token_ids) == 1 for r in responses)  # one step, one token
        assert [t for r in responses for t in r.token_ids] == greedy_reference(next_logits, prompt, 9)
        assert [r.is_final for r in responses] == [False] * 8 + [True]


def test_logprobs_of_raw_logits(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    sampling = _core.SamplingConfig(temperature=0.8, repetition_penalty=1.3, seed=11, num_logprobs=3)
    prompt = [4, 8]
    rid = executor.enqueue(_core.Request(prompt, sampling=sampling, stop=_core.StopConfig(max_tokens=6)))
    [r] = collect(executor, [rid])[rid]
    last = prompt[-1]
    for token, logprob, top in zip(r.token_ids, r.logprobs, r.top_logprobs):
        row = next_logits[last]
        log_softmax = row - row.max() - np.log(np.exp(row - row.max()).sum())
        assert logprob == pytest.approx(log_softmax[token], abs=1e-4)
        order = np.argsort(-log_softmax, kind="stable")[:3]
        assert [t for t, _ in top] == list(order)
        assert [lp for _, lp in top] == pytest.approx(log_softmax[order], abs=1e-4)
        last = token
    assert len(r.logprobs) == len(r.top_logprobs) == 6


def test_seeded_sampling_does_not_depend_on_the_batch(markov):
    engine, _ = markov
    sampling = _core.SamplingConfig(temperature=1.5, top_p=0.95, seed=1234)
    request = lambda: _core.Request([9, 3], sampling=sampling, stop=_core.StopConfig(max_tokens=20))
    alone = make_executor(engine)
    rid = alone.enqueue(request())
    expected = list(collect(alone, [rid])[rid][0].token_ids)

    crowded = make_executor(engine, seed=99)
    others = [crowded.enqueue(_core.Request(p, sampling=_core.SamplingConfig(temperature=1.0),
                                            stop=_core.StopConfig(max_tokens=7))) for p in PROMPTS[:3]]
    rid = crowded.enqueue(request())
    got = collect(crowded, others + [rid])
    assert list(got[rid][0].token_ids) == expected
    # The sequence is not the greedy one: sampling really happened.
    other_seed = _core.SamplingConfig(temperature=1.5, top_p=0.95, seed=4321)
    rid2 = crowded.enqueue(_core.Request([9, 3], sampling=other_seed, stop=_core.StopConfig(max_tokens=20)))
    assert list(collect(crowded, [rid2])[rid2][0].token_ids) != expected


def test_cancel(long_markov):
    executor = make_executor(long_markov, max_kv_tokens=LONG_SEQ_LEN, tokens_per_block=64)
    running = executor.enqueue(greedy_request([1], LONG_SEQ_LEN, streaming=True))
    waiting = executor.enqueue(greedy_request([2], LONG_SEQ_LEN))  # the pool holds only `running`
    collect_first = executor.await_responses(5000)
    assert collect_first and collect_first[0].request_id == running and not collect_first[0].is_final
    assert executor.cancel(waiting) is True
    assert executor.cancel(running) is True
    got = collect(executor, [running, waiting])
    assert got[running][-1].finish_reason == _core.FinishReason.CANCELLED
    assert got[waiting][-1].finish_reason == _core.FinishReason.CANCELLED
    assert sum(len(r.token_ids) for r in got[running]) < LONG_SEQ_LEN - 1
    assert got[waiting][-1].token_ids == []
    assert executor.cancel(running) is False  # already finished
    with pytest.raises(ValueError, match="unknown request id 12345"):
        executor.cancel(12345)
    stats = executor.get_stats()
    assert stats.kv_cache.num_used_blocks == 0 and stats.num_active_requests == 0


@pytest.mark.parametrize("request_args, field, message", [
    (dict(prompt=[]), "prompt_token_ids", "prompt_token_ids is empty"),
    (dict(prompt=[1, VOCAB]), "prompt_token_ids",
     f"prompt_token_ids\\[1\\] = {VOCAB} is outside the vocabulary \\[0, {VOCAB}\\)"),
    (dict(prompt=[-1]), "prompt_token_ids", "= -1 is outside"),
    (dict(prompt=[1] * 25), "prompt_token_ids", "prompt of 25 tokens exceeds max_input_len 24"),
    (dict(stop=dict(max_tokens=0)), "max_tokens", "max_tokens=0 is invalid: it must be >= 1"),
    (dict(stop=dict(min_tokens=-2)), "min_tokens", "min_tokens=-2 is invalid: it must be in \\[0, max_tokens=16\\]"),
    (dict(stop=dict(end_ids=[VOCAB + 5])), "end_ids", f"end_ids\\[0\\] = {VOCAB + 5}"),
    (dict(stop=dict(stop_token_ids=[VOCAB])), "stop_token_ids", f"stop_token_ids\\[0\\] = {VOCAB}"),
    (dict(sampling=dict(logit_bias={VOCAB: 1.0})), "logit_bias", f"logit_bias token id {VOCAB} is outside"),
    (dict(sampling=dict(temperature=-1.0)), "temperature", "temperature=-1 is invalid: it must be a finite number >= 0"),
    (dict(sampling=dict(top_p=0.0)), "top_p", "top_p=0 is invalid: it must be in \\(0, 1\\]"),
])
def test_enqueue_rejects_bad_requests(markov, request_args, field, message):
    engine, _ = markov
    executor = make_executor(engine)
    request = _core.Request(request_args.get("prompt", [1, 2]),
                            sampling=_core.SamplingConfig(**request_args.get("sampling", {})),
                            stop=_core.StopConfig(**request_args.get("stop", {})))
    with pytest.raises(_core.InvalidArgumentError, match=message) as info:
        executor.enqueue(request)
    assert isinstance(info.value, ValueError) and info.value.field == field


def test_kv_pool_smaller_than_one_sequence_is_an_error(markov):
    engine, _ = markov
    with pytest.raises(_core.RtllmError, match="6 blocks .*max_seq_len 48.* 12 blocks"):
        make_executor(engine, max_kv_tokens=24, tokens_per_block=4)


def test_shutdown_cancels_pending_and_is_idempotent(long_markov):
    executor = make_executor(long_markov, max_kv_tokens=LONG_SEQ_LEN, tokens_per_block=64)
    ids = [executor.enqueue(greedy_request([i + 1], LONG_SEQ_LEN)) for i in range(3)]
    executor.shutdown()
    executor.shutdown()
    assert executor.is_shutdown
    got = collect(executor, ids)
    assert [got[i][-1].finish_reason for i in ids] == [_core.FinishReason.CANCELLED] * 3
    with pytest.raises(_core.RtllmError, match="shut down"):
        executor.enqueue(greedy_request([1], 2))
    assert executor.await_responses(1000) == []  # returns at once: nothing will come


def test_shutdown_releases_the_model_runner_at_once(markov):
    """shutdown() deletes the runner (weights, KV pool, workspace) while the Executor object lives on;
    what stays readable still works, and so does a new executor on the same engine."""
    engine, next_logits = markov
    gc.collect()  # executors other tests dropped go now, not in the middle of the counts below
    before = _core.Executor.num_live_runners()
    executor = make_executor(engine)
    assert _core.Executor.num_live_runners() == before + 1
    rid = executor.enqueue(greedy_request([3, 4], 5))
    assert list(collect(executor, [rid])[rid][-1].token_ids) == greedy_reference(next_logits, [3, 4], 5)
    executor.shutdown()
    assert _core.Executor.num_live_runners() == before
    assert executor.get_stats().num_completed_requests == 1
    assert len(executor.get_iteration_stats()) >= 1
    with pytest.raises(_core.RtllmError, match="shut down"):
        executor.enqueue(greedy_request([1], 2))
    executor.shutdown()
    assert _core.Executor.num_live_runners() == before

    second = make_executor(engine)
    assert _core.Executor.num_live_runners() == before + 1
    rid = second.enqueue(greedy_request([3, 4], 5))
    assert list(collect(second, [rid])[rid][-1].token_ids) == greedy_reference(next_logits, [3, 4], 5)
    del second  # never shut down: the destructor does it
    gc.collect()
    assert _core.Executor.num_live_runners() == before


def test_enqueue_from_many_threads(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    ids, lock = {}, threading.Lock()

    def worker(k):
        for j in range(5):
            prompt = [(k * 7 + j) % VOCAB, (k + j) % VOCAB]
            rid = executor.enqueue(greedy_request(prompt, 4 + j))
            with lock:
                ids[rid] = (prompt, 4 + j)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = collect(executor, list(ids))
    for rid, (prompt, n) in ids.items():
        assert list(got[rid][0].token_ids) == greedy_reference(next_logits, prompt, n)


def test_idle_loop_sleeps(markov):
    engine, _ = markov
    executor = make_executor(engine)
    rid = executor.enqueue(greedy_request([1, 2], 3))
    collect(executor, [rid])
    cpu_before, wall_before = time.process_time(), time.time()
    time.sleep(0.5)
    # A spinning loop would take a whole core (>= 1.0 of wall time); the margin below 1.0 leaves room
    # for the other threads of the test process (other engines' pools, torch), which also count here.
    assert time.process_time() - cpu_before < 0.5 * (time.time() - wall_before)  # no busy wait


def test_a_failing_request_does_not_stop_the_others(markov):
    engine, next_logits = markov
    executor = make_executor(engine)
    good = [executor.enqueue(greedy_request(p, 6)) for p in PROMPTS[:2]]
    # Every id is an end id and the first token may not be one: nothing can be drawn.
    bad = executor.enqueue(greedy_request([5], 6, end_ids=list(range(VOCAB)), min_tokens=1))
    got = collect(executor, good + [bad])
    [failure] = got[bad]
    assert failure.finish_reason == _core.FinishReason.ERROR and "masked" in failure.error
    for rid, prompt in zip(good, PROMPTS[:2]):
        assert got[rid][0].finish_reason == _core.FinishReason.LENGTH
        assert list(got[rid][0].token_ids) == greedy_reference(next_logits, prompt, 6)
    assert executor.get_stats().kv_cache.num_used_blocks == 0
