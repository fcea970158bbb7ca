"""The server's limits and timeouts, with their defaults (`rtllm serve` flags of the same names).
Imports nothing from the serve extra, so the CLI parser can show the defaults without it."""
from __future__ import annotations

import dataclasses


def _check_positive(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name}={value!r} must be a number > 0")


def _check_count(obj, names) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """Connection timeouts and limit, and the drain on shutdown (serve/server.py applies them)."""
    header_timeout_s: float = 30.0      # the request head must arrive within this
    keep_alive_timeout_s: float = 5.0   # an idle kept-alive connection is closed after this
    max_connections: int = 1024         # open connections at most
    drain_timeout_s: float = 10.0       # on SIGTERM, running requests may finish within this

    def __post_init__(self):
        _check_positive(self, ("header_timeout_s", "keep_alive_timeout_s", "drain_timeout_s"))
        _check_count(self, ("max_connections",))


# Characters one token stands for at most, generously: a prompt longer than max_input_len times
# this cannot fit, and is refused before it is tokenized.
MAX_CHARS_PER_TOKEN = 64


@dataclasses.dataclass(frozen=True)
class AdmissionLimits:
    """What one request and the engine's waiting queue may hold, and how long a body may take."""
    max_seqs_per_request: int = 256  # prompts x n of one request; more: 400
    max_waiting_seqs: int = 1024     # sequences waiting in the engine; a request that would pass it: 429
    body_timeout_s: float = 30.0     # the request body must arrive within this; else 408

    def __post_init__(self):
        _check_count(self, ("max_seqs_per_request", "max_waiting_seqs"))
        _check_positive(self, ("body_timeout_s",))
