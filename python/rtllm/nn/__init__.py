"""Model building blocks mirroring torch.nn naming; they trace into the builder's Network."""

from ..builder.tensor import Parameter
from .module import Embedding, Linear, Module, ModuleList, RMSNorm

__all__ = ["Embedding", "Linear", "Module", "ModuleList", "Parameter", "RMSNorm"]
