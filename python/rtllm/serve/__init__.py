"""rtllm serve: an OpenAI-compatible HTTP server over one LLM (FastAPI + uvicorn, the `serve` extra).

`rtllm.serve.app.build_app(llm, model_name)` builds the ASGI app; `rtllm serve` (serve/cli.py) runs it.
This module imports nothing from the extra, so `import rtllm` works without it.
"""
from __future__ import annotations

import importlib.util

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: request bodies beyond it get 413
MISSING_EXTRA_MESSAGE = "rtllm serve needs FastAPI and uvicorn: pip install 'rtllm[serve]'"


def require_serve_extra() -> None:
    """Raises ImportError with the install command when FastAPI or uvicorn is missing."""
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"{MISSING_EXTRA_MESSAGE} ({', '.join(missing)} not installed)")
