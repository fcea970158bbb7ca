"""GenerationResult: the future/stream of one request, fed by the executor's background thread.

The background thread calls `_handle_response` with each core response; users read snapshots
(RequestOutput) through `result()`, `await`, `for` or `async for`. Snapshots are copies, so a
consumer may keep them while generation goes on (all of a request's snapshots share one list of
prompt ids, which nobody may change).
"""
from __future__ import annotations

import asyncio
import collections
import threading
from typing import Callable, Optional

from rtllm.executor.detokenizer import IncrementalDetokenizer
from rtllm.executor.outputs import CompletionOutput, RequestOutput
from rtllm.sampling_params import SamplingParams

class Wakeups:
    """The event-loop wake-ups owed to async consumers while the background thread routes one batch
    of responses, sent as one call_soon_threadsafe per loop (each is a write to the loop's self-pipe:
    with hundreds of streams, one per response cost more than the routing itself)."""

    def __init__(self):
        self._events_by_loop: dict = {}

    def add(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        self._events_by_loop.setdefault(loop, []).append(event)

    def send(self) -> None:
        for loop, events in self._events_by_loop.items():
            try:
                loop.call_soon_threadsafe(_set_all, events)
            except RuntimeError:  # the consumer's loop is closed
                pass
        self._events_by_loop.clear()


def _set_all(events) -> None:
    for event in events:
        event.set()


# Core FinishReason name -> (finish_reason, whether stop_reason is the stop token id).
_FINISH_REASONS = {"END_ID": ("stop", False), "STOP_TOKEN_ID": ("stop", True),
                   "LENGTH": ("length", False), "CANCELLED": ("cancelled", False)}


def _top_logprobs_dict(entries, token_id: int, logprob: float) -> dict:
    top = {}
    for entry in entries:  # (token_id, logprob) pairs or objects with those fields
        tid, lp = (entry.token_id, entry.logprob) if hasattr(entry, "token_id") else entry
        top[int(tid)] = float(lp)
    top.setdefault(int(token_id), float(logprob))
    return top


class _Sample:
    """The growing state of one of a request's n sequences."""

    def __init__(self, index: int, params: SamplingParams, tokenizer):
        self.index = index
        self.core_id: Optional[int] = None
        self.token_ids: list = []
        self.logprobs: Optional[list] = None if params.logprobs is None else []
        self.cumulative_logprob: Optional[float] = None if params.logprobs is None else 0.0
        self.num_top_logprobs = params.logprobs or 0
        detokenize = tokenizer is not None and params.detokenize
        self.detokenizer = (IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
                            if detokenize else None)
        self.stop_strings = params.stop_strings
        self.include_stop_str = params.include_stop_str_in_output
        # Streamed text withholds the last (longest stop string - 1) chars, which may begin a stop
        # string, so emitted text is never taken back.
        self.num_held_chars = 0 if params.include_stop_str_in_output or not self.stop_strings else \
            max(len(s) for s in self.stop_strings) - 1
        self.full_text = ""  # detokenized text, truncated at a matched stop string
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.prev_text_len = 0
        self.prev_num_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        if self.finished or self.num_held_chars == 0:
            return self.full_text
        return self.full_text[:max(self.prev_text_len, len(self.full_text) - self.num_held_chars)]

    def add(self, response) -> bool:
        """Applies one core response; returns True when a stop string ended the sequence."""
        new_ids = [int(t) for t in response.token_ids]
        self.token_ids.extend(new_ids)
        if self.logprobs is not None:
            for i, (token_id, logprob) in enumerate(zip(new_ids, response.logprobs)):
                self.cumulative_logprob += float(logprob)
                if self.num_top_logprobs > 0:
                    self.logprobs.append(_top_logprobs_dict(response.top_logprobs[i], token_id, logprob))
                else:
                    self.logprobs.append(float(logprob))
        stopped = False
        if self.detokenizer is not None:
            old_len = len(self.full_text)
            self.full_text += self.detokenizer.add_tokens(new_ids, final=response.is_final)
            stopped = self._match_stop_string(old_len)
        if response.is_final and not self.finished:
            name = getattr(response.finish_reason, "name", str(response.finish_reason)).upper()
            self.finish_reason, reason_is_token = _FINISH_REASONS.get(name, ("stop", False))
            if reason_is_token:
                self.stop_reason = int(response.stop_token_id)
        return stopped

    def _match_stop_string(self, old_len: int) -> bool:
        best = None  # (start, stop string) of the earliest match in the new text
        for s in self.stop_strings:
            start = self.full_text.find(s, max(0, old_len - len(s) + 1))
            if start >= 0 and (best is None or start < best[0]):
                best = (start, s)
        if best is None:
            return False
        start, s = best
        self.full_text = self.full_text[:start + len(s) if self.include_stop_str else start]
        self.finish_reason, self.stop_reason = "stop", s
        return True

    def snapshot(self) -> CompletionOutput:
        text = self.text
        out = CompletionOutput(
            index=self.index, text=text, token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            _prev_text_len=self.prev_text_len, _prev_num_tokens=self.prev_num_tokens)
        self.prev_text_len, self.prev_num_tokens = len(text), len(self.token_ids)
        return out


class GenerationResult:
    """A request in flight. Await it (or call result()) for the final RequestOutput; iterate it
    (for / async for) for the streamed partial outputs, ending with the final one."""

    def __init__(self, request_id: int, prompt: Optional[str], prompt_token_ids: list,
                 params: SamplingParams, streaming: bool, tokenizer,
                 cancel_core: Callable[[int], None]):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = params
        self.streaming = streaming
        self._samples = [_Sample(i, params, tokenizer) for i in range(params.n)]
        # Filled from sample 0's responses (only its core request scores the prompt).
        self.prompt_logprobs: Optional[list] = None if params.prompt_logprobs is None else [None]
        self._cancel_core = cancel_core
        self._cond = threading.Condition()
        self._pending = collections.deque()  # snapshots not yet taken by an iterator
        self._latest: Optional[RequestOutput] = None
        self._done = False
        self._error: Optional[str] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._event: Optional[asyncio.Event] = None

    # Background-thread side.

    def _handle_response(self, index: int, response, wakeups: Optional[Wakeups] = None) -> None:
        """Applies one core response; an async consumer's wake-up goes to `wakeups` when given
        (the caller sends them), else right away."""
        sample = self._samples[index]
        if sample.finished:  # e.g. the cancel that follows a stop-string match
            return
        if getattr(response.finish_reason, "name", "") == "ERROR":
            self._fail(response.error or "the request failed")
            return
        if index == 0 and self.prompt_logprobs is not None:
            for token_id, logprob, top in response.prompt_logprobs:
                self.prompt_logprobs.append(_top_logprobs_dict(top, token_id, logprob))
        if sample.add(response) and not response.is_final:
            self._cancel_core(sample.core_id)
        if self.streaming or all(s.finished for s in self._samples):
            self._publish(wakeups)

    def _publish(self, wakeups: Optional[Wakeups] = None) -> None:
        done = all(s.finished for s in self._samples)
        output = RequestOutput(request_id=self.request_id, prompt=self.prompt,
                               prompt_token_ids=self.prompt_token_ids,
                               outputs=[s.snapshot() for s in self._samples], finished=done,
                               prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
                               _result=self)
        with self._cond:
            self._latest = output
            self._pending.append(output)
            self._done = done
            self._notify_locked(wakeups)

    def _fail(self, message: str) -> None:
        for sample in self._samples:
            if not sample.finished:
                sample.finish_reason = "error"
                if sample.core_id is not None:
                    self._cancel_core(sample.core_id)
        with self._cond:
            if self._done:
                return
            self._error = message
            self._done = True
            self._notify_locked()

    def _notify_locked(self, wakeups: Optional[Wakeups] = None) -> None:
        self._cond.notify_all()
        if self._loop is None:
            return
        if wakeups is not None:
            wakeups.add(self._loop, self._event)
            return
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:  # the consumer's loop is closed
            pass

    # User side.

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def outputs(self) -> list:
        return [] if self._latest is None else self._latest.outputs

    def abort(self) -> None:
        """Cancels the request's unfinished sequences; they finish with reason "cancelled"."""
        for sample in self._samples:
            if not sample.finished and sample.core_id is not None:
                self._cancel_core(sample.core_id)

    def _final_output(self) -> RequestOutput:
        if self._error is not None:
            from rtllm import _core
            raise _core.RtllmError(f"request {self.request_id} failed: {self._error}")
        return self._latest

    def result(self, timeout: Optional[float] = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish in {timeout} s")
        return self._final_output()

    def _take_locked(self):
        """The next snapshot, StopIteration's cue (None, True), or (None, False) to wait."""
        if self._pending:
            return self._pending.popleft(), False
        return None, self._done

    def __iter__(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._done)
                item, end = self._take_locked()
            if item is not None:
                yield item
            elif end:
                self._final_output()  # raises if the request failed
                return

    def _attach_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:  # attached by an earlier wait (set once, never reset)
            return
        with self._cond:
            if self._loop is None:
                self._loop, self._event = loop, asyncio.Event()
            elif self._loop is not loop:
                raise RuntimeError(f"request {self.request_id} is awaited from two event loops")

    async def _wait_async(self, ready: Callable[[], bool]) -> None:
        """Waits on the event loop until `ready()`. A cancelled wait (the awaiting task was
        cancelled, e.g. by asyncio.wait_for or a closed client) aborts the request, as vLLM's
        generate() does: nobody is left to read its outputs."""
        self._attach_loop()
        try:
            while True:
                with self._cond:
                    if ready():
                        return
                    self._event.clear()
                await self._event.wait()
        except asyncio.CancelledError:
            self.abort()
            raise

    async def aresult(self) -> RequestOutput:
        await self._wait_async(lambda: self._done)
        return self._final_output()

    def __await__(self):
        return self.aresult().__await__()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        await self._wait_async(lambda: bool(self._pending) or self._done)
        with self._cond:
            item, end = self._take_locked()
        if item is not None:
            return item
        self._final_output()
        raise StopAsyncIteration
