"""prompt_logprobs (vLLM's semantics) against HF transformers' teacher-forced log-probabilities
(float32, CPU), on every architecture; and the explicit logits rows they rest on."""
import math

import numpy as np
import pytest
import torch

from rtllm import LLM, SamplingParams, SchedulerConfig
from rtllm import _core

from hf_reference import ARCHITECTURES, load_hf_model, random_prompts

TOLERANCE = 1e-4  # |rtllm - HF| per log-probability, float32 on both sides


def hf_prompt_logprobs(model, prompt):
    """[len(prompt) - 1, vocab] float64 log-softmax of the logits at positions 0 .. n-2."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, :-1].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_against_hf(outputs, prompts, hf, num_top):
    for out, prompt in zip(outputs, prompts):
        expected = hf_prompt_logprobs(hf, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i, entry in enumerate(out.prompt_logprobs[1:]):
            row, token = expected[i], prompt[i + 1]
            assert abs(entry[token] - row[token]) < TOLERANCE, (i, entry[token], row[token])
            top = np.argsort(-row, kind="stable")[:num_top]
            assert set(entry) == set(top.tolist()) | {token}, i
            for t, lp in entry.items():
                assert abs(lp - row[t]) < TOLERANCE


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prompt_logprobs_match_hf_teacher_forcing(tiny_model, arch):
    checkpoint = tiny_model(arch)
    prompts = random_prompts(np.random.default_rng(3), [2, 9, 40])
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    with LLM(checkpoint, max_seq_len=128, max_batch_size=4, skip_tokenizer_init=True) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    check_against_hf(outputs, prompts, load_hf_model(checkpoint), num_top=3)


def test_prompt_logprobs_in_chunks_with_few_rows_and_a_shared_prefix(tiny_model):
    """Few rows of logits per step force the prompt into unaligned chunks; a second request sharing
    the prefix still scores every position (no prefix reuse), greedy tokens stay those of a plain run."""
    checkpoint = tiny_model("qwen3")
    rng = np.random.default_rng(4)
    base = random_prompts(rng, [50])[0]
    prompts = [base, base[:30] + random_prompts(rng, [15])[0], random_prompts(rng, [5])[0]]
    scored = SamplingParams(max_tokens=4, temperature=0.0, prompt_logprobs=0)
    plain = SamplingParams(max_tokens=4, temperature=0.0)
    scheduler = SchedulerConfig(enable_chunked_prefill=True)
    with LLM(checkpoint, max_seq_len=128, max_batch_size=3, max_num_tokens=64, max_num_logits=3 + 7,
             scheduler_config=scheduler, kv_cache_config=None, skip_tokenizer_init=True) as llm:
        first = llm.generate(prompts[:1], plain, use_tqdm=False)  # caches the shared prefix
        outputs = llm.generate(prompts, scored, use_tqdm=False)
        again = llm.generate(prompts, plain, use_tqdm=False)
        steps = llm.get_iteration_stats()
    assert outputs[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in again]
    assert again[0].prompt_logprobs is None
    check_against_hf(outputs, prompts, load_hf_model(checkpoint), num_top=0)
    assert len(steps) > 0


def test_prompt_logprobs_need_rows_beyond_one_per_sequence(tiny_model):
    with LLM(tiny_model("llama"), max_batch_size=2, max_num_logits=2, skip_tokenizer_init=True) as llm:
        with pytest.raises(ValueError, match="max_num_logits 2 must exceed max_batch_size 2"):
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    with pytest.raises(ValueError, match="max_num_logits=1 must be an int >= max_batch_size"):
        LLM(tiny_model("llama"), max_batch_size=2, max_num_logits=1, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_runner_computes_logits_of_explicit_token_indices(tiny_model, tmp_path):
    """Rows for any packed tokens, in any order with repeats, equal the rows of the plain step."""
    import rtllm
    from rtllm.models import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_hugging_face(str(tiny_model("llama")))
    rtllm.build(model, rtllm.BuildConfig(max_batch_size=4, max_input_len=64, max_seq_len=128)).save(tmp_path)
    engine = _core.Engine.load(str(tmp_path))
    prompts = random_prompts(np.random.default_rng(5), [6, 11])
    ids = np.concatenate([np.asarray(p, np.int32) for p in prompts])

    def run(indices=None, max_num_logits=0):
        runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=8, tokens_per_block=16,
                                                               max_num_logits=max_num_logits))
        table = np.array([[0], [1]], np.int32)
        return runner.forward(ids, [6, 11], [0, 0], table, logits_indices=indices)

    plain = run()
    rows = run([16, 5, 5, 0, 9], max_num_logits=8)
    hf = load_hf_model(tiny_model("llama"))
    with torch.no_grad():
        every = [hf(torch.tensor([p])).logits[0].numpy() for p in prompts]
    expected = [every[1][10], every[0][5], every[0][5], every[0][0], every[1][3]]
    for got, want in zip(rows, expected):
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
    assert np.array_equal(rows[0], plain[1]) and np.array_equal(rows[1], plain[0])
    with pytest.raises(ValueError, match="logits_indices has 9 entries, more than max_num_logits 8"):
        _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=8, tokens_per_block=16, max_num_logits=8)) \
            .forward(ids, [6, 11], [0, 0], np.array([[0], [1]], np.int32), logits_indices=[0] * 9)
    with pytest.raises(ValueError, match=r"logits_indices\[0\] = 17 outside the step's tokens \[0, 17\)"):
        run([17], max_num_logits=8)
