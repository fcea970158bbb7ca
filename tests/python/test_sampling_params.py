"""SamplingParams validation: every invalid value raises InvalidArgumentError (a ValueError) naming
the field and its limit; value ranges come from the C++ core, with its message."""
import math
import pickle

import pytest

from rtllm import InvalidArgumentError, SamplingParams, _core

BAD_VALUES = [
    ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 2.5), ("max_tokens", True),
    ("min_tokens", -1),
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
    ("stop_token_ids", [-1]), ("stop_token_ids", "ab"), ("stop_token_ids", [1.5]), ("stop_token_ids", 5),
    ("logprobs", -1), ("logprobs", 1.0),
    ("logit_bias", {1: math.inf}), ("logit_bias", {2: math.nan}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {"3": 1.0}), ("logit_bias", {4: "high"}), ("logit_bias", [1, 2]),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_value_raises_naming_it(name, value):
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**{name: value})
    assert isinstance(info.value, ValueError) and info.value.field == name
    message = str(info.value)
    assert message.startswith(name) and "is invalid: it must be" in message


# Values that cross into a fixed-width C++ field: named with the limit, never an OverflowError or a
# pybind11 signature dump.
OUT_OF_RANGE = [
    ("top_k", 2**40, "2147483647"), ("max_tokens", 2**31, "2147483647"), ("min_tokens", -2**31 - 1, "-2147483648"),
    ("stop_token_ids", [2**40], "2147483647"), ("end_id", 2**63, "2147483647"), ("logit_bias", {2**40: 1.0}, "2147483647"),
    ("logprobs", 2**31, "20"), ("seed", -1, "2**64"), ("seed", 2**64, "2**64"),
]


@pytest.mark.parametrize("name,value,limit", OUT_OF_RANGE)
def test_out_of_range_int_names_field_and_limit(name, value, limit):
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(**{name: value})
    assert info.value.field == name and str(info.value).startswith(f"{name}=") and limit in str(info.value)


# (SamplingParams fields, the core config they become): the error is C++'s, word for word.
ONLY_CPP_CHECKS = [
    (dict(temperature=-0.5), dict(temperature=-0.5), None),
    (dict(top_p=1.5), dict(top_p=1.5), None),
    (dict(top_k=-3), dict(top_k=-3), None),
    (dict(min_p=2), dict(min_p=2.0), None),
    (dict(repetition_penalty=0), dict(repetition_penalty=0.0), None),
    (dict(presence_penalty=3), dict(presence_penalty=3.0), None),
    (dict(logit_bias={7: math.nan}), dict(logit_bias={7: math.nan}), None),
    (dict(max_tokens=0), None, dict(max_tokens=0)),
    (dict(max_tokens=4, min_tokens=5), None, dict(max_tokens=4, min_tokens=5)),
    (dict(stop_token_ids=[3, -2]), None, dict(stop_token_ids=[3, -2])),
]


@pytest.mark.parametrize("params,sampling,stop", ONLY_CPP_CHECKS)
def test_message_is_cpp_message(params, sampling, stop):
    core = _core.SamplingConfig(**sampling) if sampling is not None else _core.StopConfig(**stop)
    with pytest.raises(InvalidArgumentError) as from_cpp:
        core.validate()
    with pytest.raises(InvalidArgumentError) as from_python:
        SamplingParams(**params)
    assert str(from_python.value) == str(from_cpp.value)
    assert from_python.value.field == from_cpp.value.field == next(iter(params.keys() - {"max_tokens"}), "max_tokens")


def test_cpp_field_names_map_to_sampling_params_names():
    with pytest.raises(InvalidArgumentError) as from_cpp:
        _core.StopConfig(end_ids=[-1]).validate()
    assert from_cpp.value.field == "end_ids"
    with pytest.raises(InvalidArgumentError) as info:
        SamplingParams(end_id=-1)
    assert info.value.field == "end_id" and str(info.value) == str(from_cpp.value)


def test_invalid_argument_error_keeps_field_through_pickle():
    error = pickle.loads(pickle.dumps(InvalidArgumentError("top_p=2 is invalid", "top_p")))
    assert isinstance(error, ValueError) and error.field == "top_p" and str(error) == "top_p=2 is invalid"


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
    sp = SamplingParams()  # max_tokens None: up to the context length, every entry point's default
    assert (sp.max_tokens, sp.temperature, sp.top_k, sp.top_p, sp.n) == (None, 1.0, 0, 1.0, 1)
    assert sp.stop_strings == [] and sp.logprobs is None and sp.detokenize


def test_stop_strings_normalized():
    assert SamplingParams(stop="END").stop_strings == ["END"]
    assert SamplingParams(stop=("a", "b")).stop_strings == ["a", "b"]


def test_to_core_end_ids_and_seed_offset():
    from rtllm import _core
    sampling, stop = SamplingParams(seed=7, top_k=3, logprobs=2, max_tokens=9,
                                    stop_token_ids=[4]).to_core(end_ids=[1, 2], seed_offset=3)
    assert isinstance(sampling, _core.SamplingConfig) and isinstance(stop, _core.StopConfig)
    assert (sampling.top_k, sampling.num_logprobs) == (3, 2)
    assert sampling.seed not in (7, 10) and 0 <= sampling.seed < 2**64  # hashed from (7, 3)
    assert (list(stop.end_ids), list(stop.stop_token_ids), stop.max_tokens) == ([1, 2], [4], 9)
    _, stop = SamplingParams(end_id=5).to_core(end_ids=[1])
    assert list(stop.end_ids) == [5]
    sampling, _ = SamplingParams().to_core(end_ids=[])
    assert sampling.seed is None and sampling.num_logprobs == -1 and sampling.logit_bias == {}
    sampling, _ = SamplingParams(logit_bias={5: 2, 9: -1.5}).to_core(end_ids=[])
    assert sampling.logit_bias == {5: 2.0, 9: -1.5}
