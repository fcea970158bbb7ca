"""OpenAI response bodies and stream chunks, built from rtllm's RequestOutputs.

Choices carry vLLM's `stop_reason` next to `finish_reason`: the stop token id or stop string
that ended the choice, null otherwise (an end-of-sequence id, the length limit, a cancel).

A formatter serves one HTTP request: one RequestOutput stream per prompt, each with n sequences.
Choice `index` is prompt_index * n + sequence index, as OpenAI numbers choices of a prompt list.
"""
from __future__ import annotations

import time
import uuid
from typing import Optional

# rtllm's finish reasons -> OpenAI's ("cancelled" happens when the client went away).
_FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def _split_logprob(entry, token_id: int):
    """rtllm's per-token entry (a float, or {token_id: logprob} with the top N and the sampled
    token; None for a prompt's first token) -> (sampled token's logprob, [(token_id, logprob)] best
    first), (None, None) for None."""
    if entry is None:
        return None, None
    if isinstance(entry, dict):
        return entry[token_id], sorted(entry.items(), key=lambda item: -item[1])
    return entry, []


class _Formatter:
    """Shared bookkeeping; subclasses write the completions or the chat format."""

    object_name: str
    chunk_object_name: str

    def __init__(self, request_id: str, model: str, n: int, num_logprobs: Optional[int],
                 tokenizer, include_usage: bool = False):
        self.request_id, self.model, self.n = request_id, model, n
        self.num_logprobs = num_logprobs  # None: no logprobs
        self.created = int(time.time())
        self._tokenizer = tokenizer
        self.include_usage = include_usage
        self._finished: set = set()  # choice indexes whose finish_reason was streamed
        self._num_tokens: dict = {}  # choice index -> tokens generated so far

    def _token_text(self, token_id: int) -> str:
        if self._tokenizer is None:
            return ""
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    def _envelope(self, object_name: str, choices: list) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices}

    def _chunk(self, choices: list) -> dict:
        chunk = self._envelope(self.chunk_object_name, choices)
        if self.include_usage:  # OpenAI: every chunk has "usage", null but in the last one
            chunk["usage"] = None
        return chunk

    def start_chunks(self) -> list:
        return []

    def _echo(self, prompt_index: int, index: int, output):
        """(text, logprobs) a choice starts with: nothing but with the completions' echo."""
        return "", None

    @staticmethod
    def _joined_logprobs(first, second):
        if first is None or second is None:
            return first if second is None else second
        return {key: None if first[key] is None else first[key] + second[key] for key in first}

    def stream_chunks(self, prompt_index: int, output) -> list:
        """Chunks for what `output` (a streamed RequestOutput) adds, one choice per chunk."""
        chunks = []
        for sequence in output.outputs:
            index = prompt_index * self.n + sequence.index
            if index in self._finished:
                continue
            echo_text, echo_logprobs = ("", None) if index in self._num_tokens else self._echo(prompt_index, index,
                                                                                                 output)
            self._num_tokens[index] = len(sequence.token_ids)
            reason = _FINISH_REASONS.get(sequence.finish_reason, sequence.finish_reason)
            if reason is not None:
                self._finished.add(index)
            new_ids = sequence.token_ids_diff
            logprobs = None
            if self.num_logprobs is not None and new_ids:
                first = len(sequence.token_ids) - len(new_ids)
                logprobs = self._logprobs(index, new_ids, sequence.logprobs[first:])
            logprobs = self._joined_logprobs(echo_logprobs, logprobs)
            text = echo_text + sequence.text_diff
            if text or logprobs is not None or reason is not None:
                chunks.append(self._chunk([self._stream_choice(index, text, logprobs, reason,
                                                               sequence.stop_reason)]))
        return chunks

    def usage_chunk(self, num_prompt_tokens: int) -> dict:
        chunk = self._envelope(self.chunk_object_name, [])
        chunk["usage"] = usage(num_prompt_tokens, sum(self._num_tokens.values()))
        return chunk

    def response(self, outputs: list) -> dict:
        """The whole response from each prompt's final RequestOutput."""
        choices, num_completion_tokens = [], 0
        for prompt_index, output in enumerate(outputs):
            for sequence in output.outputs:
                index = prompt_index * self.n + sequence.index
                echo_text, logprobs = self._echo(prompt_index, index, output)
                if self.num_logprobs is not None:
                    logprobs = self._joined_logprobs(logprobs, self._logprobs(index, sequence.token_ids,
                                                                              sequence.logprobs))
                reason = _FINISH_REASONS.get(sequence.finish_reason, sequence.finish_reason)
                choices.append(self._choice(index, echo_text + sequence.text, logprobs, reason,
                                            sequence.stop_reason))
                num_completion_tokens += len(sequence.token_ids)
        body = self._envelope(self.object_name, choices)
        body["usage"] = usage(sum(len(o.prompt_token_ids) for o in outputs), num_completion_tokens)
        return body


class CompletionFormatter(_Formatter):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, *args, echo_texts: Optional[list] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_offsets: dict = {}  # choice index -> characters of its tokens so far
        self._echo_texts = echo_texts  # per prompt: the text echoed before each of its choices

    def _echo(self, prompt_index: int, index: int, output):
        """OpenAI's echo: the prompt's text, and with logprobs its tokens' (the first has none)."""
        if self._echo_texts is None:
            return "", None
        logprobs = None
        if self.num_logprobs is not None:
            logprobs = self._logprobs(index, output.prompt_token_ids, output.prompt_logprobs)
        return self._echo_texts[prompt_index], logprobs

    def _logprobs(self, index: int, token_ids: list, entries: list) -> dict:
        """The legacy completions format: parallel lists over the tokens."""
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        offset = self._text_offsets.get(index, 0)
        for token_id, entry in zip(token_ids, entries):
            logprob, top = _split_logprob(entry, token_id)
            text = self._token_text(token_id)
            tokens.append(text)
            token_logprobs.append(logprob)
            # OpenAI returns the sampled token too, so up to logprobs + 1 entries. Tokens that
            # decode alike (parts of one UTF-8 character) share a key, which keeps the best.
            alternatives = None if top is None else {}
            for alternative, alternative_logprob in top or []:
                alternatives.setdefault(self._token_text(alternative), alternative_logprob)
            top_logprobs.append(alternatives)
            text_offset.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs if self.num_logprobs else None, "text_offset": text_offset}

    def _choice(self, index, text, logprobs, reason, stop_reason=None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason,
                "stop_reason": stop_reason}

    _stream_choice = _choice


class ChatFormatter(_Formatter):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, index: int, token_ids: list, entries: list) -> dict:
        content = []
        for token_id, entry in zip(token_ids, entries):
            logprob, top = _split_logprob(entry, token_id)
            item = self._entry(token_id, logprob)
            item["top_logprobs"] = [self._entry(t, lp) for t, lp in top[:self.num_logprobs]]
            content.append(item)
        return {"content": content}

    def start_chunks(self) -> list:
        """The assistant role opens every choice's stream, before any token."""
        return [self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}])
                for index in range(self.n)]

    def _choice(self, index, text, logprobs, reason, stop_reason=None) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": reason, "stop_reason": stop_reason}

    def _stream_choice(self, index, text, logprobs, reason, stop_reason=None) -> dict:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                "finish_reason": reason, "stop_reason": stop_reason}
