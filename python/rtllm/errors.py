"""InvalidArgumentError: the ValueError for an invalid argument, with the field it names.

The C++ core raises it for its `InvalidArgument` (the bindings translate it, keeping C++'s message
and field), and Python-side checks raise it for what C++ never sees (types, Python-only fields), so
callers such as the server read `field` instead of parsing messages.
"""
from __future__ import annotations

from typing import Optional


class InvalidArgumentError(ValueError):
    """`field` names the offending argument (e.g. "top_p", "stop_token_ids"), or is None."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # keeps `field` through pickling (process pools, multiprocessing)
        return type(self), (str(self), self.field)
