"""SamplingParams validation: every out-of-range value raises ValueError naming it and its limit."""
import math

import pytest

from rtllm import SamplingParams

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.5), ("max_tokens", True),
    ("min_tokens", -1), ("min_tokens", 33),  # > max_tokens (32)
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("top_k", -1), ("top_k", 1.5),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5),
    ("min_p", -0.01), ("min_p", 1.5),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5), ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0), ("frequency_penalty", -2.5),
    ("seed", -1), ("seed", 2**64), ("seed", 1.0),
    ("n", 0), ("n", -2),
    ("end_id", -1), ("pad_id", -3),
    ("stop", ""), ("stop", ["ok", ""]), ("stop", [1, 2]),
    ("stop_token_ids", [-1]), ("stop_token_ids", "ab"), ("stop_token_ids", [1.5]),
    ("logprobs", -1), ("logprobs", 1.0),
    ("logit_bias", {1: math.inf}), ("logit_bias", {2: math.nan}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"3": 1.0}), ("logit_bias", {4: "high"}), ("logit_bias", [1, 2]),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_value_raises_naming_it(name, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{name: value})
    message = str(info.value)
    assert name in message and repr(value) in message and "must be" in message


GOOD_VALUES = [
    ("max_tokens", 1), ("min_tokens", 32), ("temperature", 0.0), ("temperature", 5), ("top_k", 0),
    ("top_k", 50), ("top_p", 1.0), ("top_p", 1e-6), ("min_p", 0.0), ("min_p", 1.0),
    ("repetition_penalty", 1e-3), ("presence_penalty", -2.0), ("frequency_penalty", 2.0),
    ("seed", 0), ("seed", 2**64 - 1), ("n", 4), ("end_id", 0), ("stop", "\n"), ("stop", ["a", "bc"]),
    ("stop_token_ids", [0, 5]), ("stop_token_ids", (3,)), ("logprobs", 0), ("logprobs", 5),
    ("logit_bias", {}), ("logit_bias", {3: 100.0, 0: -100.0}), ("logit_bias", {7: -0.5}),
]


@pytest.mark.parametrize("name,value", GOOD_VALUES)
def test_good_value_accepted(name, value):
    assert getattr(SamplingParams(**{name: value}), name) == \
        (list(value) if isinstance(value, tuple) else value)


def test_defaults_follow_trtllm():
    sp = SamplingParams()
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.n) == (32, 1.0, 0, 1.0, 1)
    assert sp.stop_strings == [] and sp.logprobs is None and sp.detokenize


def test_stop_strings_normalized():
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]


def test_to_core_end_ids_and_seed_offset():
    from rtllm import _core
    sampling, stop = SamplingParams(seed=7, top_k=3, logprobs=2, max_tokens=9,
                                    stop_token_ids=[4]).to_core(end_ids=[1, 2], seed_offset=3)
    assert isinstance(sampling, _core.SamplingConfig) and isinstance(stop, _core.StopConfig)
    assert (sampling.seed, sampling.top_k, sampling.num_logprobs) == (10, 3, 2)
    assert (list(stop.end_ids), list(stop.stop_token_ids), stop.max_tokens) == ([1, 2], [4], 9)
    _, stop = SamplingParams(end_id=5).to_core(end_ids=[1])
    assert list(stop.end_ids) == [5]
    sampling, _ = SamplingParams().to_core(end_ids=[])
    assert sampling.seed is None and sampling.num_logprobs == -1 and sampling.logit_bias == {}
    sampling, _ = SamplingParams(logit_bias={5: 2, 9: -1.5}).to_core(end_ids=[])
    assert sampling.logit_bias == {5: 2.0, 9: -1.5}
