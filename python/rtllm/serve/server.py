"""The HTTP server under the app: uvicorn with the limits a server facing hostile clients needs.

- A request's head must arrive within `header_timeout_s` of the connection opening (or of its
  first byte on a kept-alive connection, idle at most `keep_alive_timeout_s` before it); its body
  within `body_timeout_s` (the app's side, see app.read_json_object). Idle and trickling connections are closed, so they cannot pile up
  until the file descriptors run out.
- At most `max_connections` connections are open at once; more are closed at once, and requests
  beyond it get uvicorn's 503.
- Running out of file descriptors anyway is logged once per interval, not once per accept.
- On SIGTERM or Ctrl+C the server drains: it stops accepting, lets running requests finish for
  `drain_timeout_s`, then aborts those left, whose streams end with a final chunk and [DONE].
"""
from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rtllm.serve.limits import ConnectionLimits

logger = logging.getLogger("rtllm.serve")

# How often running out of file descriptors is logged at most.
FD_EXHAUSTION_LOG_INTERVAL_S = 10.0


def raise_fd_limit() -> int:
    """Raises the soft limit on open files to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head: header_timeout_s from the
    connection's opening, or on a kept-alive connection from the first byte after a response (the
    keep-alive timeout governs the idle time before it). Uvicorn arms no timer on a new connection,
    and its keep-alive timer stops at the first byte, so without this a client that sends nothing,
    or a header a byte at a time, holds its connection forever."""

    limits: ConnectionLimits  # set by the subclass build_protocol makes
    _head_deadline = None
    _deadline_cycle = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.transport.close()  # frees the descriptor at once; connection_lost unregisters it
            return
        self._arm_head_deadline(None)

    def data_received(self, data: bytes) -> None:
        if self._head_deadline is None and self.cycle is not None and self.cycle.response_complete:
            self._arm_head_deadline(self.cycle)  # the first byte after a response: a new head starts
        super().data_received(data)
        if self._head_deadline is not None and self.cycle is not self._deadline_cycle:
            self._cancel_head_deadline()  # the head has arrived

    def connection_lost(self, exc) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self, cycle) -> None:
        self._cancel_head_deadline()
        # A new request head replaces self.cycle: if the cycle is still `cycle` (the last one
        # whose head arrived, None at first) when the timer fires, no head has arrived in time.
        self._deadline_cycle = cycle
        self._head_deadline = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out, cycle)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self, cycle) -> None:
        self._head_deadline = None
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def build_protocol(limits: ConnectionLimits) -> type:
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})


class _FdExhaustionLog:
    """A loop exception handler that logs running out of file descriptors once per interval (with
    how many times it happened), and passes everything else to the default handler."""

    def __init__(self, interval_s: float = FD_EXHAUSTION_LOG_INTERVAL_S):
        self.interval_s = interval_s
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, loop, context: dict) -> None:
        error = context.get("exception")
        if isinstance(error, ValueError) and "_start_serving" in repr(context.get("handle")):
            # asyncio retries accepting a second after running out of descriptors, even when the
            # server socket has been closed since (shutdown): nothing is wrong.
            return
        if not (isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE)):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self._last < self.interval_s:
            self._suppressed += 1
            return
        more = f" ({self._suppressed} more times in the last {self.interval_s:g} s)" if self._suppressed else ""
        logger.error("out of file descriptors, new connections wait: %s%s; lower --max-connections or "
                     "raise the open-files limit (ulimit -n)", error.strerror, more)
        self._last = now
        self._suppressed = 0


class Server(uvicorn.Server):
    """uvicorn.Server that drains the app on shutdown and logs descriptor exhaustion once per interval."""

    def __init__(self, config: uvicorn.Config, drain=None, drain_timeout_s: float = 10.0):
        super().__init__(config)
        self._drain = drain
        self._drain_timeout_s = drain_timeout_s

    async def startup(self, sockets=None) -> None:
        asyncio.get_running_loop().set_exception_handler(_FdExhaustionLog())
        await super().startup(sockets)

    async def shutdown(self, sockets=None) -> None:
        if self._drain is not None:
            self._drain(self._drain_timeout_s)
        await super().shutdown(sockets)


def make_server(app, limits: ConnectionLimits = ConnectionLimits(), **config) -> Server:
    """A Server for `app` (built by build_app) under `limits`; `config` goes to uvicorn.Config."""
    # Past the drain, uvicorn cancels what is left; the streams have ended by then.
    config = uvicorn.Config(app, http=build_protocol(limits), timeout_keep_alive=limits.keep_alive_timeout_s,
                            limit_concurrency=limits.max_connections + 1,  # connection_made caps connections
                            timeout_graceful_shutdown=limits.drain_timeout_s + 5, **config)
    drain = getattr(getattr(app, "state", None), "drain", None)
    return Server(config, drain=drain, drain_timeout_s=limits.drain_timeout_s)
