"""Sampling on the device (RuntimeConfig.device_sampling, the CUDA default) through the whole engine.

References, all computed from the logits of `ModelRunner.forward` on the same GPU:
- token frequencies against the float64 numpy distribution of tests/python/test_sampling.py;
- logprobs against a float64 log_softmax of those logits;
- tokens and logprobs against the logits-on-host path (device_sampling=False: the CPU Sampler reads
  the same float32 logits), for greedy, seeded, penalized and min_tokens-masked requests.
Requests whose logits are compared run one at a time with block reuse off, so each prefill is exactly
the single-sequence step `ModelRunner.forward` runs (the same kernels on the same shapes).
"""
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE, random_prompts  # noqa: E402
from test_generation_vs_hf import build_engine  # noqa: E402
from test_sampling import NUM_SAMPLES, check_token_frequencies  # noqa: E402
from tokenizer_fixture import make_tokenizer  # noqa: E402

from rtllm import LLM, KvCacheConfig, SamplingParams, _core  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device or no CUDA backend in this build")

TOKENS_PER_BLOCK = 16
LOGPROB_ATOL = 1e-3
PATHS_LOGPROB_ATOL = 1e-4  # device vs CPU Sampler on the same float32 logits (float64 sums on both)
FREQUENCY_SETTINGS = [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.5, top_k=5),
    dict(temperature=1.0, top_p=0.7), dict(temperature=1.2, min_p=0.2),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)]


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    checkpoint = tmp_path_factory.mktemp("llama")
    make_hf_checkpoint(checkpoint, arch="llama", dtype="float32", tie_word_embeddings=False,
                       vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    make_tokenizer(checkpoint, vocab_size=VOCAB_SIZE)
    return build_engine(checkpoint, tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="module")
def engine(engine_dir):
    return _core.Engine.load(str(engine_dir))


def gpu_last_logits(engine, prompt):
    """Last-token logits of one prompt in a single-sequence context step on the GPU, float32."""
    num_blocks = -(-len(prompt) // TOKENS_PER_BLOCK)
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(device=_core.DeviceKind.CUDA, num_kv_blocks=num_blocks,
                                                           tokens_per_block=TOKENS_PER_BLOCK))
    blocks = np.arange(num_blocks, dtype=np.int32).reshape(1, num_blocks)
    return np.asarray(runner.forward(np.asarray(prompt, np.int32), [len(prompt)], [0], blocks)[0])


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def core_executor(engine, device_sampling):
    runtime = _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=TOKENS_PER_BLOCK)
    runtime.device_sampling = device_sampling
    kv = _core.KvCacheConfig(free_memory_fraction=0.02, tokens_per_block=TOKENS_PER_BLOCK, enable_block_reuse=False)
    return _core.Executor(engine, _core.ExecutorConfig(runtime=runtime, kv_cache=kv))


def run_one(executor, request, expect_error=False):
    """Runs one request alone; returns its final response (token_ids, logprobs, top_logprobs, ...)."""
    request_id = executor.enqueue(request)
    while True:
        for response in executor.await_responses(1000):
            assert response.request_id == request_id
            if response.is_final:
                assert (response.finish_reason == _core.FinishReason.ERROR) == expect_error, response.error
                return response


def run_alone(engine, requests, device_sampling):
    executor = core_executor(engine, device_sampling)
    try:
        return [run_one(executor, r) for r in requests]
    finally:
        executor.shutdown()


def mixed_requests(prompts):
    """Greedy, seeded, penalized, min_tokens-masked and top-logprob requests over the prompts."""
    samplings = [
        dict(temperature=0.0, num_logprobs=3),
        dict(temperature=0.9, top_p=0.95, seed=7, num_logprobs=0),
        dict(temperature=1.1, top_k=12, min_p=0.02, seed=8, repetition_penalty=1.3),
        dict(temperature=0.7, seed=9, presence_penalty=0.8, frequency_penalty=-0.5, num_logprobs=5),
        dict(temperature=0.0, repetition_penalty=0.7, frequency_penalty=1.5)]
    requests = []
    for i, prompt in enumerate(prompts):
        sampling = _core.SamplingConfig(**samplings[i % len(samplings)])
        # min_tokens masks the end id (and the stop ids) for the first 8 tokens.
        stop = _core.StopConfig(max_tokens=16, min_tokens=8, end_ids=[EOS_ID], stop_token_ids=[5, 6])
        requests.append(_core.Request(list(prompt), sampling=sampling, stop=stop))
    return requests


def test_device_path_matches_host_path(engine):
    """Same requests, same GPU logits: device sampling and the CPU Sampler agree token for token."""
    prompts = random_prompts(np.random.default_rng(31), [1, 5, 9, 17, 30, 41, 64, 3, 12, 25])
    device = run_alone(engine, mixed_requests(prompts), device_sampling=True)
    host = run_alone(engine, mixed_requests(prompts), device_sampling=False)
    for d, h in zip(device, host):
        assert list(d.token_ids) == list(h.token_ids)
        assert d.finish_reason == h.finish_reason
        np.testing.assert_allclose(d.logprobs, h.logprobs, atol=PATHS_LOGPROB_ATOL)
        for d_top, h_top in zip(d.top_logprobs, h.top_logprobs):
            assert [t for t, _ in d_top] == [t for t, _ in h_top]
            np.testing.assert_allclose([p for _, p in d_top], [p for _, p in h_top], atol=PATHS_LOGPROB_ATOL)


def test_min_tokens_masks_end_id_on_device(engine):
    """The end id is masked before min_tokens: a prompt whose greedy next token is the end id still runs on."""
    executor = core_executor(engine, device_sampling=True)
    try:
        prompts = random_prompts(np.random.default_rng(32), [4, 8, 16, 32])
        for prompt in prompts:
            end_id = int(np.argmax(gpu_last_logits(engine, prompt)))  # greedy would end at once
            stop = _core.StopConfig(max_tokens=6, min_tokens=3, end_ids=[end_id])
            response = run_one(executor, _core.Request(list(prompt), sampling=_core.SamplingConfig(temperature=0.0),
                                                       stop=stop))
            assert len(response.token_ids) >= 3 and end_id not in list(response.token_ids)[:3]
    finally:
        executor.shutdown()


@pytest.mark.parametrize("device_sampling", [True, False])
def test_every_token_masked_fails_only_that_request(engine, device_sampling):
    """All ids masked (stop ids before min_tokens): that request ends with an error, the next one runs."""
    executor = core_executor(engine, device_sampling)
    try:
        prompt = random_prompts(np.random.default_rng(34), [6])[0]
        stop = _core.StopConfig(max_tokens=4, min_tokens=2, stop_token_ids=list(range(VOCAB_SIZE)))
        failed = run_one(executor, _core.Request(list(prompt), stop=stop), expect_error=True)
        assert len(failed.token_ids) == 0 and "masked" in failed.error
        ok = run_one(executor, _core.Request(list(prompt), stop=_core.StopConfig(max_tokens=4, ignore_eos=True)))
        assert len(ok.token_ids) == 4
    finally:
        executor.shutdown()


def test_logprobs_match_log_softmax_of_forward_logits(engine):
    prompts = random_prompts(np.random.default_rng(33), [2, 9, 20, 47])
    requests = [_core.Request(list(p), sampling=_core.SamplingConfig(temperature=1.0, seed=s, num_logprobs=8),
                              stop=_core.StopConfig(max_tokens=1, ignore_eos=True))
                for s, p in enumerate(prompts)]
    for prompt, response in zip(prompts, run_alone(engine, requests, device_sampling=True)):
        expected = log_softmax(gpu_last_logits(engine, prompt))
        token = response.token_ids[0]
        assert abs(response.logprobs[0] - expected[token]) <= LOGPROB_ATOL
        top = response.top_logprobs[0]
        assert len(top) == 8
        top_ids = [t for t, _ in top]
        np.testing.assert_allclose([p for _, p in top], expected[top_ids], atol=LOGPROB_ATOL)
        # The 8 highest, in order (a tie within the tolerance may swap neighbours).
        np.testing.assert_allclose([p for _, p in top], np.sort(expected)[::-1][:8], atol=LOGPROB_ATOL)


@pytest.fixture(scope="module")
def one_seq_llm(engine_dir):
    """max_batch_size 1 and no block reuse: each prefill is the step gpu_last_logits runs."""
    kv = KvCacheConfig(free_gpu_memory_fraction=0.02, tokens_per_block=TOKENS_PER_BLOCK, enable_block_reuse=False)
    with LLM(model=str(engine_dir), device="cuda", max_batch_size=1, kv_cache_config=kv) as llm:
        yield llm


@pytest.mark.parametrize("settings", FREQUENCY_SETTINGS)
def test_token_frequencies_match_reference(engine, one_seq_llm, settings):
    prompt = random_prompts(np.random.default_rng(11), [9])[0]
    check_token_frequencies(one_seq_llm, prompt, gpu_last_logits(engine, prompt), settings, NUM_SAMPLES)


def test_seeded_sampling_is_reproducible_across_runs_and_batches(engine_dir):
    rng = np.random.default_rng(12)
    prompt = random_prompts(rng, [9])[0]
    others = random_prompts(rng, [3, 30, 17, 5, 44])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    mixed = [SamplingParams(max_tokens=7, temperature=0.9, seed=int(s), ignore_eos=True)
             for s in rng.integers(0, 1000, size=len(others))]
    kv = KvCacheConfig(free_gpu_memory_fraction=0.02)
    with LLM(model=str(engine_dir), device="cuda", kv_cache_config=kv) as llm:
        alone = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
        again = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
        batch = llm.generate(others[:2] + [prompt] + others[2:], mixed[:2] + [params] + mixed[2:], use_tqdm=False)
        # The same request several times in one batch: every copy draws the same tokens.
        copies = llm.generate([prompt] * 4 + others[:2], [params] * 4 + mixed[:2], use_tqdm=False)
    assert alone == again == batch[2].outputs[0].token_ids
    assert all(c.outputs[0].token_ids == alone for c in copies[:4])


def biased_requests(prompts, rng):
    """Greedy and seeded requests with logit_bias: forcing (+100), banning (-100) and moderate biases."""
    samplings = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95, seed=21),
                 dict(temperature=1.0, top_k=30, seed=22, repetition_penalty=1.2, num_logprobs=2)]
    requests = []
    for i, prompt in enumerate(prompts):
        ids = rng.choice(VOCAB_SIZE, size=12, replace=False).tolist()
        kind = i % 3
        bias = ({ids[0]: 100.0} if kind == 0 else {t: -100.0 for t in ids} if kind == 1
                else {t: float(rng.uniform(-5, 5)) for t in ids})
        sampling = _core.SamplingConfig(**samplings[i % len(samplings)], logit_bias=bias)
        requests.append(_core.Request(list(prompt), sampling=sampling,
                                      stop=_core.StopConfig(max_tokens=12, ignore_eos=True)))
    return requests


def test_logit_bias_device_path_matches_host_path(engine):
    """Same GPU logits: the kernel's bias stage and the CPU Sampler's draw the same tokens."""
    prompts = random_prompts(np.random.default_rng(41), [2, 7, 11, 19, 33, 8, 15, 26, 4])
    device = run_alone(engine, biased_requests(prompts, np.random.default_rng(42)), device_sampling=True)
    host = run_alone(engine, biased_requests(prompts, np.random.default_rng(42)), device_sampling=False)
    for request, d, h in zip(biased_requests(prompts, np.random.default_rng(42)), device, host):
        assert list(d.token_ids) == list(h.token_ids)
        np.testing.assert_allclose(d.logprobs, h.logprobs, atol=PATHS_LOGPROB_ATOL)
        bias = request.sampling.logit_bias
        if 100.0 in bias.values():
            assert list(d.token_ids) == [next(iter(bias))] * 12
        if -100.0 in bias.values():
            assert not set(d.token_ids) & set(bias)


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)],
                         ids=["greedy", "sampled"])
def test_logit_bias_same_tokens_on_cpu_and_cuda(engine_dir, settings):
    """+100 forces the same tokens on both devices; -100 bans tokens on both (their other draws may
    differ: CUDA computes in bf16)."""
    rng = np.random.default_rng(43)
    prompts = random_prompts(rng, [5, 13, 21])
    forced = rng.choice(VOCAB_SIZE, size=len(prompts), replace=False).tolist()
    banned = rng.choice(VOCAB_SIZE, size=40, replace=False).tolist()
    force_params = [SamplingParams(max_tokens=10, seed=50 + i, ignore_eos=True, logit_bias={t: 100.0}, **settings)
                    for i, t in enumerate(forced)]
    ban_params = [SamplingParams(max_tokens=10, seed=60 + i, ignore_eos=True,
                                 logit_bias={t: -100.0 for t in banned}, **settings) for i in range(len(prompts))]
    outputs = {}
    for device in ("cpu", "cuda"):
        kv = KvCacheConfig(free_gpu_memory_fraction=0.02) if device == "cuda" else KvCacheConfig(max_tokens=4096)
        with LLM(model=str(engine_dir), device=device, kv_cache_config=kv) as llm:
            outputs[device] = ([o.outputs[0].token_ids for o in llm.generate(prompts, force_params, use_tqdm=False)],
                               [o.outputs[0].token_ids for o in llm.generate(prompts, ban_params, use_tqdm=False)])
    for device, (forced_out, banned_out) in outputs.items():
        assert forced_out == [[t] * 10 for t in forced], device
        assert all(len(o) == 10 and not set(o) & set(banned) for o in banned_out), device
    assert outputs["cpu"][0] == outputs["cuda"][0]
