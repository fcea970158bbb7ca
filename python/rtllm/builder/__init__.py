"""The model-definition DSL and builder: trace a model into a graph of rtllm ops, fuse, save an engine."""

from .build import DTYPES, BuildConfig, build, build_and_save
from .engine import Engine
from .tensor import Network, Parameter, Tensor

__all__ = ["DTYPES", "BuildConfig", "Engine", "Network", "Parameter", "Tensor", "build", "build_and_save"]
