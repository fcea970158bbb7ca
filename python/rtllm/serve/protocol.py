"""OpenAI request bodies: pydantic models, their checks, the SamplingParams they map to, and errors.

Models are strict (5 for an int, never "5" or true) and ignore unknown fields, because OpenAI
clients send fields rtllm has no use for (user, metadata, ...). Fields rtllm cannot honour
(suffix, tools, ...) are rejected with 400 rather than silently ignored.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from rtllm.errors import InvalidArgumentError
from rtllm.llmapi.llm import check_text
from rtllm.sampling_params import INT32_MAX, MAX_LOGPROBS, MAX_N, SamplingParams

MAX_PROMPTS = 128  # prompts per completions request
MAX_LOGIT_BIAS = 100.0  # OpenAI's limit for |logit_bias| values

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 500: "internal_error",
                503: "service_unavailable"}


def error_body(status: int, message: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    error_type = _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "internal_error")
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


class APIError(Exception):
    """An error the client receives as {"error": {message, type, param, code}} with `status`."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def _short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def parse_request(model_cls, data: dict):
    """Validates a JSON object; its first problem becomes a 400 naming the field and the value."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(part) for part in error["loc"]) or None
        if error["type"] == "missing":
            raise APIError(400, f"'{param}' is required", param, "missing_required_parameter") from None
        if error["type"] == "value_error":  # raised by a validator below, with its own message
            message = str(error["ctx"]["error"])
        else:
            message = f"{param}={_short_repr(error['input'])} is invalid: {error['msg'].lower()}"
        raise APIError(400, message, param, "invalid_value") from None


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _reject_unsupported(**fields) -> None:
    """Raises 400 for the first field given a value rtllm cannot honour."""
    for name, (value, supported) in fields.items():
        if not supported:
            raise APIError(400, f"{name}={_short_repr(value)} is not supported by rtllm", name,
                           "unsupported_parameter")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: Optional[bool] = None


class _SamplingRequest(BaseModel):
    """Fields common to completions and chat completions. None means "the default"."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None  # None: the served model
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # -1 means off, as in vLLM's API
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Any = None
    stop_token_ids: Optional[list[int]] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = None
    min_tokens: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    logit_bias: Optional[dict] = None

    @field_validator("n")
    @classmethod
    def _check_n(cls, n):
        if n is not None and not 1 <= n <= MAX_N:
            raise ValueError(f"n={n} is invalid: it must be in [1, {MAX_N}]")
        return n

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop):
        if stop is None or isinstance(stop, str) or (
                isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            return stop
        raise ValueError(f"stop={_short_repr(stop)} is invalid: it must be a string or a list of strings")

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, logit_bias):
        """OpenAI's map of token-id strings to biases in [-100, 100], as {int: float}."""
        if logit_bias is None:
            return None
        out = {}
        for key, bias in logit_bias.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"logit_bias key {_short_repr(key)} is invalid: it must be a token id "
                                 "written as a string of digits, such as \"50256\"")
            if not (isinstance(bias, (int, float)) and not isinstance(bias, bool)
                    and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias[{key!r}]={_short_repr(bias)} is invalid: it must be a number "
                                 f"in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]")
            out[int(key)] = float(bias)
        return out

    def check_logit_bias_ids(self, vocab_size: int) -> None:
        """400 naming logit_bias for a token id outside the served model's vocabulary."""
        for token_id in self.logit_bias or {}:
            if token_id >= vocab_size:
                raise APIError(400, f"logit_bias token id {token_id} is invalid: it must be in "
                                    f"[0, vocab_size={vocab_size})", "logit_bias", "invalid_value")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options",
                           "invalid_value")

    def sampling_params(self, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        """This request's SamplingParams; its InvalidArgumentError becomes a 400 whose param is the
        error's field (SamplingParams' fields carry the OpenAI names)."""
        top_k = 0 if self.top_k == -1 else self.top_k
        values = dict(max_tokens=max_tokens, n=self.n, temperature=self.temperature, top_p=self.top_p,
                      top_k=top_k, min_p=self.min_p, seed=self.seed, stop=self.stop,
                      stop_token_ids=self.stop_token_ids, presence_penalty=self.presence_penalty,
                      frequency_penalty=self.frequency_penalty,
                      repetition_penalty=self.repetition_penalty, ignore_eos=self.ignore_eos,
                      min_tokens=self.min_tokens, logprobs=logprobs, logit_bias=self.logit_bias)
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except InvalidArgumentError as e:
            raise APIError(400, str(e), e.field, "invalid_value") from None


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions. `prompt` is normalized to a list of prompts (strings or token ids)."""

    prompt: Any
    max_tokens: Optional[int] = None
    logprobs: Optional[int] = None
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None

    @field_validator("prompt")
    @classmethod
    def _prompt_list(cls, prompt):
        for text in [prompt] if isinstance(prompt, str) else prompt if isinstance(prompt, list) else []:
            if isinstance(text, str):
                check_text("prompt", text)
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and 0 < len(prompt):
            if all(_is_token_id(t) for t in prompt):
                return [prompt]
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"prompt holds {len(prompt)} prompts: at most {MAX_PROMPTS} are allowed")
            if all(isinstance(p, str) for p in prompt):
                return prompt
            if all(isinstance(p, list) and p and all(_is_token_id(t) for t in p) for p in prompt):
                return prompt
        raise ValueError(f"prompt={_short_repr(prompt)} is invalid: it must be a string, a list of "
                         "strings, a list of token ids or a list of token-id lists")

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, logprobs):
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs={logprobs} is invalid: it must be in [0, {MAX_LOGPROBS}]")
        return logprobs

    def check_supported(self) -> None:
        self._check_common()
        _reject_unsupported(suffix=(self.suffix, not self.suffix),
                            best_of=(self.best_of, self.best_of in (None, self.n or 1)))

    def completion_sampling_params(self, max_tokens: int) -> SamplingParams:
        """With echo and logprobs, the prompt's tokens are scored too (OpenAI's echo)."""
        params = self.sampling_params(max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs
        return params


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: str
    content: Any = None  # normalized to a string

    @field_validator("content")
    @classmethod
    def _content_text(cls, content):
        if isinstance(content, str):
            check_text("content", content)
        if content is None or isinstance(content, str):
            return content or ""
        if isinstance(content, list):  # content parts: only text ones
            texts = [part.get("text") for part in content
                     if isinstance(part, dict) and part.get("type") == "text"]
            if len(texts) == len(content) and all(isinstance(t, str) for t in texts):
                return "".join(texts)
        raise ValueError(f"content={_short_repr(content)} is invalid: it must be a string or a list "
                         "of text parts ({\"type\": \"text\", \"text\": ...}); rtllm serves text only")


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name for max_tokens
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list] = None
    tool_choice: Any = None
    functions: Optional[list] = None
    response_format: Optional[dict] = None
    # vLLM's chat-template options: open the assistant's turn, or continue the final message.
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages):
        if not messages:
            raise ValueError("messages is empty: it must hold at least one message")
        return messages

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top_logprobs):
        if top_logprobs is not None and not 0 <= top_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs={top_logprobs} is invalid: it must be in [0, {MAX_LOGPROBS}]")
        return top_logprobs

    @property
    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> Optional[int]:
        """SamplingParams.logprobs: None (off), else how many alternatives per token."""
        if not self.logprobs:
            if self.top_logprobs:
                raise APIError(400, f"top_logprobs={self.top_logprobs} needs logprobs=true",
                               "top_logprobs", "invalid_value")
            return None
        return self.top_logprobs or 0

    def check_supported(self) -> None:
        self._check_common()
        if self.tool_choice is not None and not self.tools:  # OpenAI's answer, whatever the value
            raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                                "'tools' are specified.", "tool_choice", "invalid_value")
        check_chat_options(self.add_generation_prompt, self.continue_final_message)
        response_type = (self.response_format or {}).get("type", "text")
        _reject_unsupported(tools=(self.tools, not self.tools),
                            functions=(self.functions, not self.functions),
                            response_format=(self.response_format, response_type == "text"))


def check_chat_options(add_generation_prompt: bool, continue_final_message: bool) -> None:
    if add_generation_prompt and continue_final_message:
        raise APIError(400, "add_generation_prompt and continue_final_message are both true: continuing "
                            "the final message needs add_generation_prompt=false",
                       "continue_final_message", "invalid_value")


class TokenizeRequest(BaseModel):
    """POST /tokenize, vLLM's: a `prompt`, or chat `messages` rendered with the chat template."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt):
        if prompt is not None:
            check_text("prompt", prompt)
        return prompt

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give exactly one of 'prompt' and 'messages'", "prompt", "invalid_value")
        if self.messages is not None:
            if not self.messages:
                raise APIError(400, "messages is empty: it must hold at least one message", "messages",
                               "invalid_value")
            check_chat_options(self.add_generation_prompt, self.continue_final_message)


class DetokenizeRequest(BaseModel):
    """POST /detokenize, vLLM's: token ids back to text."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: Optional[str] = None
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, tokens):
        for token in tokens:
            if not 0 <= token <= INT32_MAX:
                raise ValueError(f"tokens holds {token}: token ids are in [0, vocab_size)")
        return tokens
