"""Seeded sampling through the whole engine against a float64 numpy reference distribution."""
import numpy as np
import pytest

from rtllm import LLM, SamplingParams

from hf_reference import random_prompts
from test_generation_vs_hf import build_engine, runner_last_logits

NUM_SAMPLES = 3000


def reference_distribution(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The distribution the sampler must draw from, in float64."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, dtype=bool)
    order = np.argsort(-p, kind="stable")
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        q = np.where(keep, p, 0.0)
        q /= q.sum()
        cumulative = np.cumsum(q[order])
        # The smallest prefix whose mass reaches top_p (at least one token).
        cutoff = int(np.searchsorted(cumulative, top_p)) + 1
        keep[order[cutoff:]] = False
    if min_p > 0.0:
        keep &= p >= min_p * p.max()
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.fixture(scope="module")
def model_and_logits(tiny_model, tmp_path_factory):
    checkpoint = tiny_model("llama")
    prompt = random_prompts(np.random.default_rng(11), [9])[0]
    engine_dir = build_engine(checkpoint, tmp_path_factory.mktemp("engine"))
    logits = runner_last_logits(engine_dir, [prompt])[0]
    with LLM(model=str(engine_dir)) as llm:
        yield llm, prompt, logits


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.5, top_k=5),
    dict(temperature=1.0, top_p=0.7), dict(temperature=1.2, min_p=0.2),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05)])
def test_token_frequencies_match_reference(model_and_logits, settings):
    llm, prompt, logits = model_and_logits
    check_token_frequencies(llm, prompt, logits, settings)


def check_token_frequencies(llm, prompt, logits, settings, num_samples=NUM_SAMPLES, logit_bias=None):
    """Draws the first token of `prompt` with num_samples seeds and compares the frequencies with the
    reference distribution of `logits` (the model's last-token logits for that prompt), plus
    `logit_bias` when given."""
    params = [SamplingParams(max_tokens=1, seed=seed, ignore_eos=True, logit_bias=logit_bias, **settings)
              for seed in range(num_samples)]
    outputs = llm.generate([prompt] * num_samples, params, use_tqdm=False)
    counts = np.bincount([o.outputs[0].token_ids[0] for o in outputs], minlength=len(logits))
    biased = np.asarray(logits, np.float64).copy()
    for token_id, bias in (logit_bias or {}).items():
        biased[token_id] += bias
    expected = reference_distribution(biased, **settings)
    assert counts[expected == 0].sum() == 0, "sampled a token the settings exclude"
    frequency = counts / num_samples
    # Five standard deviations of a binomial frequency, plus slack for float32 rounding.
    bound = 5 * np.sqrt(expected * (1 - expected) / num_samples) + 1e-3
    assert np.all(np.abs(frequency - expected) <= bound)


def test_seeded_sampling_is_reproducible_across_batches(model_and_logits):
    llm, prompt, _ = model_and_logits
    rng = np.random.default_rng(12)
    others = random_prompts(rng, [3, 30, 17, 5, 44])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
    again = llm.generate(prompt, params, use_tqdm=False).outputs[0].token_ids
    mixed_params = [SamplingParams(max_tokens=7, temperature=0.9, seed=int(s), ignore_eos=True)
                    for s in rng.integers(0, 1000, size=len(others))]
    batch = llm.generate(others[:2] + [prompt] + others[2:], mixed_params[:2] + [params] + mixed_params[2:],
                         use_tqdm=False)
    assert alone == again == batch[2].outputs[0].token_ids


def test_logit_bias_shifts_the_distribution_like_the_reference(model_and_logits):
    llm, prompt, logits = model_and_logits
    order = np.argsort(-logits)
    # Lift a middling token, sink the favourite, nudge another: all three change the distribution.
    bias = {int(order[len(order) // 2]): 4.0, int(order[0]): -3.0, int(order[3]): 1.5}
    check_token_frequencies(llm, prompt, logits, dict(temperature=1.0, top_p=0.9), logit_bias=bias)


GREEDY_AND_SAMPLED = [dict(temperature=0.0), dict(temperature=0.8, top_p=0.95)]


@pytest.mark.parametrize("settings", GREEDY_AND_SAMPLED, ids=["greedy", "sampled"])
def test_logit_bias_plus_100_forces_a_token(model_and_logits, settings):
    llm, prompt, logits = model_and_logits
    forced = int(np.argsort(logits)[len(logits) // 3])  # an unlikely token
    params = [SamplingParams(max_tokens=8, seed=seed, ignore_eos=True, logit_bias={forced: 100.0}, **settings)
              for seed in range(4)]
    for output in llm.generate([prompt] * 4, params, use_tqdm=False):
        assert output.outputs[0].token_ids == [forced] * 8


@pytest.mark.parametrize("settings", GREEDY_AND_SAMPLED, ids=["greedy", "sampled"])
def test_logit_bias_minus_100_bans_tokens(model_and_logits, settings):
    llm, prompt, _ = model_and_logits
    seeds = range(6)
    plain = llm.generate([prompt] * len(seeds), [SamplingParams(max_tokens=8, seed=s, ignore_eos=True, **settings)
                                                 for s in seeds], use_tqdm=False)
    chosen = sorted({t for o in plain for t in o.outputs[0].token_ids})
    params = [SamplingParams(max_tokens=8, seed=s, ignore_eos=True, logit_bias={t: -100.0 for t in chosen},
                             **settings) for s in seeds]
    banned = llm.generate([prompt] * len(seeds), params, use_tqdm=False)
    drawn = {t for o in banned for t in o.outputs[0].token_ids}
    assert len(drawn) > 0 and not drawn & set(chosen)


def test_logit_bias_ids_are_checked_against_the_vocabulary(model_and_logits):
    llm, prompt, _ = model_and_logits
    with pytest.raises(ValueError, match=rf"logit_bias token id {llm.vocab_size} .*vocab_size={llm.vocab_size}"):
        llm.generate(prompt, SamplingParams(logit_bias={llm.vocab_size: 1.0}), use_tqdm=False)
