"""SamplingParams: how one prompt is completed (names and defaults follow TensorRT-LLM's LLM API)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

_PENALTY_LIMIT = 2.0


def _check(ok: bool, name: str, value, limit: str) -> None:
    if not ok:
        raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it must be {limit}")


def _is_int(x) -> bool:
    # numpy integers count; bools do not.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Sampling and stopping controls for one prompt.

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
    """

    max_tokens: int = 32
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
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens,
               "an int >= 1")
        _check(_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"an int in [0, max_tokens={self.max_tokens}]")
        _check(_is_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
               "temperature", self.temperature, "a finite number >= 0 (0 samples greedily)")
        _check(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0: off)")
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _check(_is_real(self.repetition_penalty) and math.isfinite(self.repetition_penalty)
               and self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty,
               "a finite number > 0 (1: off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -_PENALTY_LIMIT <= value <= _PENALTY_LIMIT, name, value,
                   f"in [-{_PENALTY_LIMIT:g}, {_PENALTY_LIMIT:g}]")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64), "seed", self.seed,
               "None or an int in [0, 2**64)")
        _check(_is_int(self.n) and self.n >= 1, "n", self.n, "an int >= 1")
        for name in ("end_id", "pad_id"):
            value = getattr(self, name)
            _check(value is None or (_is_int(value) and value >= 0), name, value, "None or an int >= 0")
        if self.stop_token_ids is not None:
            _check(not isinstance(self.stop_token_ids, (str, bytes)) and
                   all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
                   "stop_token_ids", self.stop_token_ids, "a list of ints >= 0")
            self.stop_token_ids = list(self.stop_token_ids)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        _check(all(isinstance(s, str) and s for s in stop), "stop", self.stop,
               "a non-empty string or a list of non-empty strings")
        self._stop_strings = stop
        _check(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0), "logprobs",
               self.logprobs, "None or an int >= 0")
        _check(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
               "prompt_logprobs", self.prompt_logprobs, "None or an int >= 0")
        if self.logit_bias is not None:
            _check(isinstance(self.logit_bias, dict), "logit_bias", self.logit_bias,
                   "None or a dict of token id -> bias")
            for token_id, bias in self.logit_bias.items():
                _check(_is_int(token_id) and token_id >= 0, "logit_bias", self.logit_bias,
                       f"keyed by token ids (ints >= 0), not {token_id!r}")
                _check(_is_real(bias) and math.isfinite(bias), "logit_bias", self.logit_bias,
                       f"a dict of finite biases, not {bias!r} for token {token_id}")
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}

    @property
    def stop_strings(self) -> list:
        return self._stop_strings

    def to_core(self, end_ids: Sequence[int], seed_offset: int = 0):
        """Returns (_core.SamplingConfig, _core.StopConfig) for one core request.

        `end_ids` are the model's end-of-sequence ids, used when `end_id` is None. `seed_offset`
        separates the n samples of one prompt (seed, seed + 1, ...); only the first (offset 0) scores
        the prompt, which all n share.
        """
        from rtllm import _core

        seed = None if self.seed is None else (int(self.seed) + seed_offset) % 2**64
        sampling = _core.SamplingConfig(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
            min_p=float(self.min_p), repetition_penalty=float(self.repetition_penalty),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty), seed=seed,
            num_logprobs=-1 if self.logprobs is None else int(self.logprobs),
            logit_bias=dict(self.logit_bias or {}),
            num_prompt_logprobs=-1 if self.prompt_logprobs is None or seed_offset else int(self.prompt_logprobs))
        stop = _core.StopConfig(
            max_tokens=int(self.max_tokens), min_tokens=int(self.min_tokens),
            end_ids=[int(self.end_id)] if self.end_id is not None else [int(i) for i in end_ids],
            stop_token_ids=[int(i) for i in self.stop_token_ids or []], ignore_eos=bool(self.ignore_eos))
        return sampling, stop
