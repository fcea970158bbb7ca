"""rtllm: an LLM inference engine (C++ core, Python builder and LLM API).

The pure-Python API (SamplingParams, configs, tokenizer) imports without the C++ extension
(SamplingParams needs it when constructed: C++ checks its values); names that need it
(RtllmError) or the builder load on first use.
"""
__version__ = "0.1.0"

import os as _os

from rtllm.errors import InvalidArgumentError
from rtllm.llmapi import (LLM, CapacitySchedulerPolicy, CompletionOutput, KvCacheConfig,
                          RequestOutput, SamplingParams, SchedulerConfig)

_LAZY = {
    "RtllmError": ("rtllm._core", "RtllmError"),
    "BuildConfig": ("rtllm.builder", "BuildConfig"),
    "build": ("rtllm.builder", "build"),
    "Engine": ("rtllm.builder", "Engine"),
    "QuantConfig": ("rtllm.quantization", "QuantConfig"),
    "QuantAlgo": ("rtllm.quantization", "QuantAlgo"),
    "quantize": ("rtllm.quantization", "quantize"),
    "Mapping": ("rtllm.mapping", "Mapping"),
}


def include_dir() -> str:
    """Directory of the installed C++ headers (rtllm/*.h)."""
    return _os.path.join(_os.path.dirname(__file__), "include")


def lib_dir() -> str:
    """Directory of the installed librtllm.so."""
    return _os.path.join(_os.path.dirname(__file__), "lib")


def cmake_dir() -> str:
    """Directory of rtllmConfig.cmake: pass it as -Drtllm_DIR to find_package(rtllm)."""
    return _os.path.join(lib_dir(), "cmake", "rtllm")


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rtllm' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "BuildConfig",
           "KvCacheConfig", "SchedulerConfig", "CapacitySchedulerPolicy", "QuantConfig", "QuantAlgo", "Mapping",
           "build", "Engine", "quantize",
           "RtllmError", "InvalidArgumentError", "__version__", "cmake_dir", "include_dir", "lib_dir"]
