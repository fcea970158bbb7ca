"""The OpenAI-compatible ASGI app over one LLM: routes, streaming, disconnects and errors.

All requests share the LLM. Each runs as engine requests submitted with
generate_async(streaming=True); the event loop only awaits their outputs, so generation (in C++)
never blocks it, and tokenizing or templating a prompt runs in a thread pool, after a length
bound that needs no tokenizer. A request whose client goes away is aborted, which frees its KV
blocks. Admission limits (AdmissionLimits) bound what one request and the waiting queue may hold;
the engine admits the sequences of different requests in turn, so a large request cannot starve
small ones. On shutdown the server drains (see drain()).
"""
from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import os
import time
from typing import Optional

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import rtllm
from rtllm.llmapi.llm import render_chat
from rtllm.serve import DEFAULT_MAX_BODY_BYTES
from rtllm.serve.limits import MAX_CHARS_PER_TOKEN, AdmissionLimits
from rtllm.serve.metrics import ServerMetrics
from rtllm.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                  TokenizeRequest, parse_request)
from rtllm.serve.responses import ChatFormatter, CompletionFormatter, new_request_id

CHAT_PAGE = os.path.join(os.path.dirname(__file__), "static", "index.html")
# Open even with an API key: liveness probes, and the chat page, a static file that a browser
# loads without headers (the page then asks for the key and sends it with its API calls).
PUBLIC_PATHS = frozenset({"/health", "/"})


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _ApiKeyMiddleware:
    """Answers 401 unless the request carries "Authorization: Bearer <key>" (the scheme in any case,
    as RFC 7235 has it; the key compared in constant time). Pure ASGI rather than
    BaseHTTPMiddleware, so streamed responses and disconnects pass through untouched."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = api_key.encode()

    def _authorized(self, header: bytes) -> bool:
        scheme, _, key = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self._expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC_PATHS:
            if not self._authorized(dict(scope["headers"]).get(b"authorization", b"")):
                error = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                response = _error_response(error)
                response.headers["WWW-Authenticate"] = "Bearer"
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


async def read_json_object(request: Request, max_bytes: int, timeout_s: float = 30.0) -> dict:
    """The body as a JSON object. 413 past `max_bytes`, checked on the declared length and again
    while reading (chunked bodies declare none); 408 unless it all arrives within `timeout_s` (a
    trickling client must not hold its connection); 400 for anything but a JSON object.

    A body up to twice the limit is read to its end (and dropped) before the 413: closing a
    connection with unread data resets it, and the client would see the reset, not the 413."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(413, f"the request body of {int(declared)} bytes exceeds the limit of {max_bytes} bytes"
                         if declared.isdigit() else f"the request body exceeds the limit of {max_bytes} bytes",
                         code="request_too_large")
    if declared.isdigit() and int(declared) > 2 * max_bytes:
        raise too_large
    body = bytearray()
    num_read = 0

    async def read():
        nonlocal num_read
        async for chunk in request.stream():
            num_read += len(chunk)
            if num_read > 2 * max_bytes:
                return  # too much to drain: answer now
            if num_read <= max_bytes:
                body.extend(chunk)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:  # nobody reads the answer; a 400 keeps it out of the error log
        raise APIError(400, "the client disconnected while sending the body") from None
    except asyncio.TimeoutError:
        if num_read > max_bytes:
            raise too_large from None
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s "
                            "(rtllm serve --body-timeout)", code="request_timeout") from None
    if num_read > max_bytes:
        raise too_large
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not a {type(data).__name__}",
                       code="invalid_json")
    return data


def _param_of(error: ValueError, prompt_param: str) -> Optional[str]:
    """The request field an engine-side ValueError blames: its `field` (InvalidArgumentError's),
    with the engine's names for the prompt read as the route's (`prompt` or `messages`)."""
    field = getattr(error, "field", None)
    return prompt_param if field in ("prompt", "prompt_token_ids") else field


class _Generation:
    """The engine requests behind one HTTP request: one per prompt, each with n sequences."""

    def __init__(self, llm, prompts: list, params, metrics: ServerMetrics, prompt_param: str,
                 group_id: int, live: set):
        self.num_prompt_tokens = sum(len(p) for p in prompts)
        self._record = metrics.start_request([len(p) for p in prompts], params.n)
        self._results: list = []
        self._closed = False
        self._live = live
        try:
            # One fairness group for all the request's sequences: the engine admits them in turn
            # with other requests' rather than all before the next request's.
            for token_ids in prompts:
                self._results.append(llm.generate_async({"prompt_token_ids": token_ids}, params,
                                                        streaming=True, group_id=group_id))
        except (ValueError, RuntimeError) as e:  # rejected before running: not counted
            self._closed = True
            self.abort()
            if isinstance(e, ValueError):
                raise APIError(400, str(e), _param_of(e, prompt_param), "invalid_value") from None
            raise APIError(503 if llm.is_shutdown else 500, f"the engine refused the request: {e}") from None
        live.add(self)

    async def outputs(self):
        """Yields (prompt index, RequestOutput) as the prompts' streams advance, until all end."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(prompt_index, result):
            try:
                async for output in result:
                    queue.put_nowait((prompt_index, output, None))
            except Exception as e:  # the request failed in the engine
                queue.put_nowait((prompt_index, None, e))
                return
            queue.put_nowait((prompt_index, None, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self._results)]
        try:
            num_running = len(tasks)
            while num_running:
                prompt_index, output, error = await queue.get()
                if error is not None:
                    raise error
                if output is None:
                    num_running -= 1
                    continue
                self._record.observe(prompt_index, output)
                yield prompt_index, output
        finally:
            for task in tasks:
                task.cancel()

    async def collect(self, request: Request) -> list:
        """Each prompt's final RequestOutput. If the client disconnects first, the engine requests
        are aborted (and end as cancelled)."""
        watcher = asyncio.ensure_future(self._abort_on_disconnect(request))
        finals = [None] * len(self._results)
        try:
            async for prompt_index, output in self.outputs():
                finals[prompt_index] = output
        except Exception as e:
            self.close(failed=True)
            raise APIError(500, f"generation failed: {e}") from None
        finally:
            watcher.cancel()
            self.close()
        return finals

    async def _abort_on_disconnect(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.abort()

    def abort(self) -> None:
        for result in self._results:
            result.abort()  # a no-op once finished

    def close(self, failed: bool = False) -> None:
        """Aborts what still runs (the client went away) and counts the request, once."""
        if not self._closed:
            self._closed = True
            self._live.discard(self)
            self.abort()
            self._record.finish(failed)


class _OpenAIServer:
    """The routes; state is the shared LLM and the metrics."""

    def __init__(self, llm, model_name: str, max_body_bytes: int, limits: AdmissionLimits,
                 chat_template: Optional[str] = None):
        self.llm = llm
        self.model_name = model_name
        self.chat_template = chat_template  # None: the tokenizer's
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.metrics = ServerMetrics()
        self.created = int(time.time())
        self._live: set = set()  # the _Generations running
        self._group_ids = itertools.count(1)
        self.draining = False

    # Lifecycle and admission.

    def drain(self, timeout_s: float) -> None:
        """Refuses new generations (503) and aborts those still running after `timeout_s`: their
        streams end with a final chunk (finish_reason "abort") and [DONE]. Called on shutdown."""
        self.draining = True

        def abort_left():
            for generation in list(self._live):
                generation.abort()

        if self._live:
            asyncio.get_running_loop().call_later(timeout_s, abort_left)

    def _check_admission(self, num_seqs: int, n_param: str) -> None:
        """Checks before any work: not draining, and prompts x n within max_seqs_per_request."""
        if self.draining:
            raise APIError(503, "the server is shutting down")
        limit = self.limits.max_seqs_per_request
        if num_seqs > limit:
            raise APIError(400, f"the request asks for {num_seqs} sequences (prompts x n): at most {limit} "
                                "are allowed per request (rtllm serve --max-seqs-per-request)", n_param,
                           "too_many_sequences")

    def _check_queue(self, num_seqs: int) -> None:
        """429 when the request's sequences would take the engine's waiting queue past its limit."""
        num_waiting = self.llm.get_stats()["num_waiting_requests"]
        limit = self.limits.max_waiting_seqs
        if num_waiting + num_seqs > limit:
            raise APIError(429, f"the server is busy: {num_waiting} sequences wait and this request adds "
                                f"{num_seqs}, past the limit of {limit} (rtllm serve --max-waiting-seqs); "
                                "retry later", code="rate_limit_exceeded")

    def _check_chars(self, num_chars: int, prompt_param: str) -> None:
        """Refuses, before tokenizing, text that cannot fit in max_input_len tokens."""
        limit = self.llm.max_input_len * MAX_CHARS_PER_TOKEN
        if num_chars > limit:
            raise APIError(400, f"the prompt has {num_chars} characters, more than max_input_len="
                                f"{self.llm.max_input_len} tokens can hold (at most {limit} characters)",
                           prompt_param, "context_length_exceeded")

    @staticmethod
    async def _off_loop(fn, *args):
        """fn(*args) in the loop's thread pool: tokenizing and templating (after _check_chars) never
        pause the event loop, and the tokenizer releases the GIL while it works."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # Plain routes.

    def _model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "rtllm",
                "max_model_len": self.llm.max_seq_len, **self.llm.limits}

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str):
        """GET /v1/models/{id}: the model, or OpenAI's 404 for another id."""
        self._check_model(model_id)
        return self._model_card()

    # vLLM's tokenizer routes.

    async def tokenize(self, request: Request):
        req = parse_request(TokenizeRequest, await read_json_object(request, self.max_body_bytes))
        req.check_supported()
        self._check_model(req.model)
        if req.messages is not None:
            token_ids = self._apply_chat_template(req.messages, req.add_generation_prompt,
                                                  req.continue_final_message)
            if req.add_special_tokens:  # templates write their own; asked for, prepend the bos
                bos = self._tokenizer("messages").bos_token_id
                token_ids = token_ids if bos is None or token_ids[:1] == [bos] else [bos] + token_ids
        else:
            token_ids = self._tokenizer("prompt").encode(
                req.prompt, add_special_tokens=req.add_special_tokens is not False)
        token_strs = None
        if req.return_token_strs:
            token_strs = [self.llm.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        return {"count": len(token_ids), "max_model_len": self.llm.max_seq_len, "tokens": token_ids,
                "token_strs": token_strs}

    async def detokenize(self, request: Request):
        req = parse_request(DetokenizeRequest, await read_json_object(request, self.max_body_bytes))
        self._check_model(req.model)
        vocab_size = self.llm.vocab_size
        for token_id in req.tokens:
            if token_id >= vocab_size:
                raise APIError(400, f"token id {token_id} is invalid: it must be in [0, vocab_size="
                                    f"{vocab_size})", "tokens", "invalid_value")
        return {"prompt": self._tokenizer("tokens").decode(req.tokens)}

    def _tokenizer(self, param: str):
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer", param)
        return self.llm.tokenizer

    async def health(self):
        if self.llm.is_shutdown:
            raise APIError(503, "the engine is shut down")
        return {"status": "ok"}

    async def version(self):
        return {"version": rtllm.__version__}

    async def prometheus_metrics(self):
        return PlainTextResponse(self.metrics.render(self.llm.get_stats()),
                                 media_type="text/plain; version=0.0.4")

    async def chat_page(self):
        if not os.path.isfile(CHAT_PAGE):
            raise APIError(404, f"the chat page is not installed ({CHAT_PAGE} is missing)")
        return FileResponse(CHAT_PAGE, media_type="text/html")

    # Generation routes.

    async def completions(self, request: Request):
        req = parse_request(CompletionRequest, await self._read_body(request))
        req.check_supported()
        self._check_model(req.model)
        self._check_admission(len(req.prompt) * (req.n or 1), "n")
        req.check_logit_bias_ids(self.llm.vocab_size)
        for p in req.prompt:
            if isinstance(p, str):
                self._check_chars(len(p), "prompt")
        prompts = await self._off_loop(lambda: [self._encode(p) for p in req.prompt])
        for token_ids in prompts:
            self._check_length(len(token_ids), req.max_tokens, "prompt")
        # By default up to the context length (every entry point's rule); an explicit max_tokens
        # that does not fit is an error.
        room = self.llm.max_seq_len - max(len(p) for p in prompts)
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        params = req.completion_sampling_params(max_tokens)
        echo_texts = await self._off_loop(lambda: [self._prompt_text(p) for p in req.prompt]) if req.echo else None
        formatter = CompletionFormatter(new_request_id("cmpl"), self.model_name, params.n, req.logprobs,
                                        self.llm.tokenizer, req.include_usage, echo_texts=echo_texts)
        return await self._respond(request, prompts, params, formatter, bool(req.stream), "prompt")

    async def chat_completions(self, request: Request):
        req = parse_request(ChatCompletionRequest, await self._read_body(request))
        req.check_supported()
        self._check_model(req.model)
        self._check_admission(req.n or 1, "n")
        req.check_logit_bias_ids(self.llm.vocab_size)
        messages = [m.model_dump() for m in req.messages]
        self._check_chars(sum(len(json.dumps(m, ensure_ascii=False)) for m in messages), "messages")
        token_ids = await self._off_loop(self._apply_chat_template, messages, req.add_generation_prompt,
                                         req.continue_final_message)
        max_tokens = req.requested_max_tokens
        self._check_length(len(token_ids), max_tokens, "messages")
        if max_tokens is None:  # as OpenAI: up to the context length
            max_tokens = self.llm.max_seq_len - len(token_ids)
        num_logprobs = req.num_logprobs()
        params = req.sampling_params(max_tokens, num_logprobs)
        formatter = ChatFormatter(new_request_id("chatcmpl"), self.model_name, params.n, num_logprobs,
                                  self.llm.tokenizer, req.include_usage)
        return await self._respond(request, [token_ids], params, formatter, bool(req.stream), "messages")

    async def _read_body(self, request: Request) -> dict:
        return await read_json_object(request, self.max_body_bytes, self.limits.body_timeout_s)

    def _check_model(self, model) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist: this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def _encode(self, prompt) -> list:
        if not isinstance(prompt, str):
            return prompt  # token ids, checked against the vocabulary by the LLM
        if self.llm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids", "prompt")
        return self.llm.tokenizer.encode(prompt)

    def _prompt_text(self, prompt) -> str:
        """The prompt as echoed: its own text, or its token ids decoded."""
        if isinstance(prompt, str) or self.llm.tokenizer is None:
            return prompt if isinstance(prompt, str) else ""
        return self.llm.tokenizer.decode(prompt, skip_special_tokens=False)

    def _apply_chat_template(self, messages, add_generation_prompt: bool = True,
                             continue_final_message: bool = False) -> list:
        tokenizer = self.llm.tokenizer
        if tokenizer is None or (tokenizer.chat_template is None and self.chat_template is None):
            raise APIError(400, "this model has no chat template: use /v1/completions, or start the "
                                "server with --chat-template", "messages")
        try:
            return render_chat(tokenizer, [m.model_dump() if hasattr(m, "model_dump") else m for m in messages],
                               add_generation_prompt, continue_final_message, self.chat_template)
        except (ValueError, jinja2.TemplateError) as e:  # e.g. a role the template rejects
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None

    def _check_length(self, num_prompt_tokens: int, max_tokens, prompt_param: str) -> None:
        limit = self.llm.max_seq_len
        if num_prompt_tokens >= limit:
            raise APIError(400, f"the prompt has {num_prompt_tokens} tokens: the model's max_seq_len={limit} "
                                f"leaves no room to generate; {self.llm.limit_hint('max_seq_len')}", prompt_param,
                           "context_length_exceeded")
        if max_tokens is not None and num_prompt_tokens + max_tokens > limit:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens "
                                f"exceeds the model's max_seq_len={limit} (at most "
                                f"{limit - num_prompt_tokens} new tokens fit)", "max_tokens",
                           "context_length_exceeded")

    async def _respond(self, request: Request, prompts: list, params, formatter, stream: bool,
                       prompt_param: str):
        if self.draining:  # it started before the drain: nothing runs it to the end
            raise APIError(503, "the server is shutting down")
        self._check_queue(len(prompts) * params.n)
        generation = _Generation(self.llm, prompts, params, self.metrics, prompt_param, next(self._group_ids),
                                 self._live)
        if not stream:
            return JSONResponse(formatter.response(await generation.collect(request)))
        # The background task counts the request even if the stream never starts (client gone).
        return StreamingResponse(self._events(generation, formatter), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"},
                                 background=BackgroundTask(generation.close))

    async def _events(self, generation: _Generation, formatter):
        """Server-sent events. A disconnect cancels this generator, whose `finally` aborts."""
        try:
            for chunk in formatter.start_chunks():
                yield _sse(chunk)
            async for prompt_index, output in generation.outputs():
                for chunk in formatter.stream_chunks(prompt_index, output):
                    yield _sse(chunk)
                # One loop turn per output, so a dropped connection is noticed (and this stream
                # cancelled) after one failed write rather than after a burst of them.
                await asyncio.sleep(0)
            if formatter.include_usage:
                yield _sse(formatter.usage_chunk(generation.num_prompt_tokens))
        except Exception as e:  # the status line is sent: the error travels in the stream
            generation.close(failed=True)
            yield _sse(APIError(500, f"generation failed: {e}").body())
        finally:
            generation.close()
        yield "data: [DONE]\n\n"


def build_app(llm, model_name: str, api_key=None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              limits: AdmissionLimits = AdmissionLimits(), chat_template: Optional[str] = None) -> FastAPI:
    """The server's ASGI app over `llm`, which it shares between requests and does not shut down.
    `chat_template` (jinja2 text) replaces the tokenizer's for chat. `app.state.drain(timeout_s)` starts
    draining it (serve/server.py calls it on shutdown)."""
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes={max_body_bytes!r} must be an int >= 1")
    if api_key is not None and not api_key:
        raise ValueError("api_key is empty: pass None for no key")
    server = _OpenAIServer(llm, model_name, max_body_bytes, limits, chat_template)
    app = FastAPI(title="rtllm", version=rtllm.__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.drain = server.drain
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model_id:path}")(server.model)
    app.post("/tokenize")(server.tokenize)
    app.post("/detokenize")(server.detokenize)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    app.get("/health")(server.health)
    app.get("/version")(server.version)
    app.get("/metrics")(server.prometheus_metrics)
    app.get("/")(server.chat_page)

    async def api_error(request, error: APIError):
        return _error_response(error)

    async def http_error(request, error: StarletteHTTPException):  # unknown route, wrong method
        if error.status_code == 404:
            message = f"{request.method} {request.url.path} is not a route of this server"
        else:
            message = f"{request.method} {request.url.path}: {error.detail}"
        return _error_response(APIError(error.status_code, message, code="not_found"
                                        if error.status_code == 404 else None))

    async def internal_error(request, error: Exception):  # uvicorn logs the traceback
        return _error_response(APIError(500, f"internal error: {type(error).__name__}: {error}"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    if api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=api_key)
    return app
