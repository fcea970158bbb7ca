"""SamplingParams: how one prompt is completed (names and defaults follow TensorRT-LLM's LLM API)."""
from __future__ import annotations

import hashlib
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

from rtllm.errors import InvalidArgumentError

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1  # fields held as int32_t in C++
# Caps shared with the server (vLLM's max_logprobs and OpenAI's top_logprobs limit; OpenAI's n):
# beyond them a request costs memory and time out of proportion to any use.
MAX_LOGPROBS = 20
MAX_N = 128
# C++ field names that SamplingParams spells otherwise.
_FIELD_OF_CORE_FIELD = {"end_ids": "end_id", "num_logprobs": "logprobs"}


def _check(ok: bool, name: str, value, limit: str) -> None:
    """The form of C++'s messages, for what only Python checks (types, Python-only fields)."""
    if not ok:
        raise InvalidArgumentError(f"{name}={value!r} is invalid: it must be {limit}", name)


def _is_int(x) -> bool:
    # numpy integers count; bools do not.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_int32(name: str, value, container=None, kind: str = "an int") -> None:
    """An int that C++ holds as int32_t (out of range it would not convert); `container` is shown in
    the message instead of the value when the int is one of its items."""
    shown = value if container is None else container
    _check(_is_int(value), name, shown, kind)
    _check(INT32_MIN <= value <= INT32_MAX, name, shown, f"{kind} in [{INT32_MIN}, {INT32_MAX}] (C++ int32)")


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded `seed`: the seed itself for sample 0, then a
    hash of (seed, index), so that no sample equals that of another request (seed + index would
    make sample i of seed s the sample of seed s + i)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclass
class SamplingParams:
    """Sampling and stopping controls for one prompt, checked on construction.

    Invalid values raise rtllm.InvalidArgumentError (a ValueError) whose `field` names the field;
    the value ranges are those of the C++ core (SamplingConfig / StopConfig::validate), with its
    message.

    temperature=0 samples greedily; top_k=0, top_p=1, min_p=0 and the penalties' neutral values
    switch those filters off. `logit_bias` maps token ids to a bias added to their logits after the
    penalties and before temperature (vLLM's and OpenAI's semantics: +100 all but forces a token,
    -100 all but bans it); the LLM checks the ids against the vocabulary. `logprobs=N` returns the sampled token's log-probability for every
    generated token (from the raw logits' log-softmax) and, for N > 0, the top N alternatives too;
    `prompt_logprobs=N` scores the prompt the same way (RequestOutput.prompt_logprobs, None for the
    first token; the prompt is then computed in full, never taken from the prefix cache).
    With `end_id=None` the tokenizer's / model's end-of-sequence ids end generation. `stop`
    strings end it when they appear in the detokenized text, which is cut before them (or after,
    with include_stop_str_in_output). pad_id and spaces_between_special_tokens are kept for
    TensorRT-LLM compatibility: batches are packed (never padded) and the tokenizer's own decoder
    places spaces.

    max_tokens=None (the default, in every entry point: the LLM API, `rtllm generate` and both
    server routes) generates until an end id, a stop condition or the model's context
    (max_seq_len) ends the sequence, as vLLM's server does. `n` is at most 128 and `logprobs` /
    `prompt_logprobs` at most 20, as the server allows. With `seed` and n > 1, sample 0 uses
    `seed` and sample i a hash of (seed, i).
    """

    max_tokens: Optional[int] = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: Optional[int] = None
    n: int = 1
    end_id: Optional[int] = None
    pad_id: Optional[int] = None
    stop: Optional[Union[str, Sequence[str]]] = None
    stop_token_ids: Optional[Sequence[int]] = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    prompt_logprobs: Optional[int] = None
    logit_bias: Optional[Dict[int, float]] = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Normalized in __post_init__: `stop` becomes a list of non-empty strings.
    _stop_strings: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        # Types, fixed-width ranges and Python-only fields here; value ranges in C++ (below).
        if self.max_tokens is not None:
            _check_int32("max_tokens", self.max_tokens, kind="None or an int")
        for name in ("min_tokens", "top_k"):
            _check_int32(name, getattr(self, name))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            _check(_is_real(getattr(self, name)), name, getattr(self, name), "a number")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed", self.seed,
               "None or an int in [0, 2**64)")
        _check(_is_int(self.n) and 1 <= self.n <= MAX_N, "n", self.n, f"an int in [1, {MAX_N}]")
        if self.end_id is not None:
            _check_int32("end_id", self.end_id)
        _check(self.pad_id is None or (_is_int(self.pad_id) and self.pad_id >= 0), "pad_id", self.pad_id,
               "None or an int >= 0")
        if self.stop_token_ids is not None:
            _check(hasattr(self.stop_token_ids, "__iter__") and not isinstance(self.stop_token_ids, (str, bytes)),
                   "stop_token_ids", self.stop_token_ids, "a list of ints")
            for token_id in self.stop_token_ids:
                _check_int32("stop_token_ids", token_id, self.stop_token_ids, "a list of ints")
            self.stop_token_ids = list(self.stop_token_ids)
        stop_kind = "a non-empty string or a list of non-empty strings"
        _check(self.stop is None or isinstance(self.stop, (str, list, tuple)), "stop", self.stop, stop_kind)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stop), "stop", self.stop, stop_kind)
        self._stop_strings = stop
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and 0 <= value <= MAX_LOGPROBS), name, value,
                   f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                   "None or a dict of token id -> bias")
            for token_id, bias in self.logit_bias.items():
                _check_int32("logit_bias", token_id, self.logit_bias, "a dict keyed by token ids (ints)")
                _check(_is_real(bias), "logit_bias", self.logit_bias,
                       f"a dict of numeric biases, not {bias!r} for token {token_id}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        sampling, stop_config = self.to_core(end_ids=[])
        try:
            sampling.validate()
            stop_config.validate()
        except InvalidArgumentError as e:  # C++'s message; the field under its SamplingParams name
            raise InvalidArgumentError(str(e), _FIELD_OF_CORE_FIELD.get(e.field, e.field)) from None

    @property
    def stop_strings(self) -> list:
        return self._stop_strings

    def to_core(self, end_ids: Sequence[int], seed_offset: int = 0):
        """Returns (_core.SamplingConfig, _core.StopConfig) for one core request.

        `end_ids` are the model's end-of-sequence ids, used when `end_id` is None. `seed_offset` is
        the sample's index among the n of one prompt (its seed is sample_seed(seed, index)); only
        the first (offset 0) scores the prompt, which all n share. max_tokens=None becomes the
        largest int32: the core ends the sequence at max_seq_len.
        """
        from rtllm import _core

        seed = None if self.seed is None else sample_seed(int(self.seed), seed_offset)
        sampling = _core.SamplingConfig(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
            min_p=float(self.min_p), repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty), seed=seed,
            num_logprobs=-1 if self.logprobs is None else int(self.logprobs),
            logit_bias=dict(self.logit_bias or {}),
            num_prompt_logprobs=-1 if self.prompt_logprobs is None or seed_offset else int(self.prompt_logprobs))
        stop = _core.StopConfig(
            max_tokens=INT32_MAX if self.max_tokens is None else int(self.max_tokens), min_tokens=int(self.min_tokens),
            end_ids=[int(self.end_id)] if self.end_id is not None else [int(i) for i in end_ids],
            stop_token_ids=[int(i) for i in self.stop_token_ids or []], ignore_eos=bool(self.ignore_eos))
        return sampling, stop
