"""The built-in default model: rtllm's demo model, shipped in the package (rtllm/demo_model).

A 4 M-parameter Llama trained on the CPU on the Python standard library's source by
examples/train_demo_model.py (model card: demo_model/README.md). It lets `rtllm generate` and
`rtllm serve` run with no model at hand and no download. A toy: it continues Python code.
"""
from __future__ import annotations

import os


def default_model_dir() -> str:
    """The demo model's HF checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
