"""GenerationExecutor: submits requests to the C++ executor and routes its responses.

A background thread loops on `_core.Executor.await_responses` (which waits with the GIL released)
and hands each response to the GenerationResult that owns its core request id.
"""
from __future__ import annotations

import threading
import weakref
from typing import Optional, Sequence

from rtllm.executor.result import GenerationResult, Wakeups
from rtllm.sampling_params import SamplingParams

_AWAIT_TIMEOUT_MS = 50  # how often the thread checks for shutdown


class _Router:
    """Owns the map core request id -> (GenerationResult, sample index); shared with the thread."""

    def __init__(self, core):
        self.core = core
        self.lock = threading.RLock()
        self.routes: dict = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.route(self.core.await_responses(_AWAIT_TIMEOUT_MS))

    def route(self, responses) -> None:
        wakeups = Wakeups()  # async consumers are woken once per event loop, after the batch
        try:
            for response in responses:
                with self.lock:
                    entry = self.routes.get(response.request_id)
                    if entry is None:  # a request given up at submit or shutdown
                        continue
                    if response.is_final:
                        del self.routes[response.request_id]
                    result, index = entry
                    try:
                        result._handle_response(index, response, wakeups)
                    except Exception as e:  # a Python-side failure ends only this request
                        result._fail(f"{type(e).__name__}: {e}")
        finally:
            wakeups.send()

    def cancel(self, core_id: int) -> None:
        try:
            self.core.cancel(core_id)
        except ValueError:
            pass

    def fail_all(self, message: str) -> None:
        with self.lock:
            results = {id(r): r for r, _ in self.routes.values()}
            self.routes.clear()
        for result in results.values():
            result._fail(message)


def _shutdown(router: _Router, thread: threading.Thread) -> None:
    router.stop_event.set()
    if thread is not threading.current_thread():
        thread.join()
    router.core.shutdown()  # ends pending requests with CANCELLED responses
    try:
        router.route(router.core.await_responses(0))
    except Exception:
        pass
    router.fail_all("the executor was shut down")


class GenerationExecutor:
    """Runs requests on a `_core.Executor`; `shutdown()` (also run at exit) stops it."""

    def __init__(self, core_executor):
        self._router = _Router(core_executor)
        self._thread = threading.Thread(target=self._router.run, name="rtllm-executor", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._router, self._thread)
        self._lock = threading.Lock()
        self._num_submitted = 0
        self._active: "weakref.WeakValueDictionary[int, GenerationResult]" = weakref.WeakValueDictionary()

    @property
    def core(self):
        return self._router.core

    def submit(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
               end_ids: Sequence[int] = (), streaming: bool = False, prompt: Optional[str] = None,
               tokenizer=None, cache_salt: Optional[str] = None,
               group_id: Optional[int] = None) -> GenerationResult:
        """Enqueues n core requests (one per sample) and returns their GenerationResult.

        Requests with different `cache_salt`s never share cached KV blocks; those with one
        `group_id` are admitted as one client's (see LLM.generate_async)."""
        from rtllm import _core

        if not self._finalizer.alive:
            raise RuntimeError("the executor was shut down")
        if group_id is not None and (isinstance(group_id, bool) or not isinstance(group_id, int)
                                     or not 0 <= group_id < 1 << 63):
            raise ValueError(f"group_id={group_id!r} is invalid: it must be an int in [0, 2^63)")
        with self._lock:
            request_id = self._num_submitted
            self._num_submitted += 1
        router = self._router
        result = GenerationResult(request_id, prompt, prompt_token_ids, sampling_params, streaming,
                                  tokenizer, router.cancel)
        # Stop strings are matched in the text as it grows, so the core streams to us even when the
        # user waits for the final output only.
        core_streaming = streaming or bool(sampling_params.stop_strings)
        token_ids = [int(t) for t in prompt_token_ids]
        with router.lock:  # responses are routed only once every sample is registered
            try:
                for index, sample in enumerate(result._samples):
                    sampling, stop = sampling_params.to_core(end_ids, seed_offset=index)
                    request = _core.Request(token_ids, sampling=sampling, stop=stop,
                                            streaming=core_streaming, cache_salt=cache_salt, group_id=group_id)
                    sample.core_id = self.core.enqueue(request)
                    router.routes[sample.core_id] = (result, index)
            except BaseException:
                for sample in result._samples:
                    if sample.core_id is not None:
                        router.routes.pop(sample.core_id, None)
                        router.cancel(sample.core_id)
                raise
        self._active[request_id] = result
        return result

    def abort(self, request_id: int) -> None:
        """Cancels a request; ValueError for an id this executor never returned."""
        if isinstance(request_id, bool) or not isinstance(request_id, int) or \
                not 0 <= request_id < self._num_submitted:
            raise ValueError(f"unknown request_id={request_id!r}: ids submitted so far are "
                             f"0..{self._num_submitted - 1}")
        result = self._active.get(request_id)
        if result is not None:
            result.abort()

    def get_stats(self):
        return self.core.get_stats()

    def shutdown(self) -> None:
        """Stops the response thread and the core executor; unfinished requests fail. Idempotent."""
        self._finalizer()

    @property
    def is_shutdown(self) -> bool:
        return not self._finalizer.alive
