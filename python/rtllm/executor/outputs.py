"""RequestOutput and CompletionOutput (fields as in TensorRT-LLM's LLM API)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class CompletionOutput:
    """One generated sequence of a request.

    logprobs: None unless SamplingParams.logprobs was set; then per generated token either the
    sampled token's log-probability (logprobs=0) or a dict {token_id: logprob} holding the top N
    and the sampled token (logprobs=N > 0).
    finish_reason: None while running, else "stop" (end id, stop token id or stop string),
    "length" or "cancelled". stop_reason: the stop token id or stop string that ended it.
    """

    index: int
    text: str = ""
    token_ids: list = field(default_factory=list)
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[list] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[Union[int, str]] = None
    # Where this output's text / token_ids stood at the previous streamed output.
    _prev_text_len: int = field(default=0, repr=False)
    _prev_num_tokens: int = field(default=0, repr=False)

    @property
    def text_diff(self) -> str:
        return self.text[self._prev_text_len:]

    @property
    def token_ids_diff(self) -> list:
        return self.token_ids[self._prev_num_tokens:]

    @property
    def length(self) -> int:
        return len(self.token_ids)


@dataclass
class RequestOutput:
    """A snapshot of one request: the final result, or a streamed partial one (finished=False).

    prompt_logprobs: None unless SamplingParams.prompt_logprobs was set; then per prompt token None
    for the first and a dict {token_id: logprob} holding the prompt token and the top N (vLLM's).
    """

    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list
    finished: bool
    prompt_logprobs: Optional[list] = None
    _result: Any = field(default=None, repr=False, compare=False)

    def abort(self) -> None:
        """Cancels the request (a no-op once it finished)."""
        if self._result is not None:
            self._result.abort()
