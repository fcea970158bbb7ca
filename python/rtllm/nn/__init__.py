"""The layer library: building blocks mirroring torch.nn naming that trace into the builder's Network.
Linears load their own tensor-parallel shard (linear.py)."""

from ..builder.tensor import Parameter
from .attention import Attention
from .decoder_layer import DecoderLayer
from .embedding import Embedding, ParallelLMHead
from .linear import ColumnLinear, Linear, MergedColumnLinear, QKVColumnLinear, RowLinear, tp_shard
from .mlp import GatedMLP
from .module import Module, ModuleList, default_weight_loader
from .normalization import RMSNorm

__all__ = ["Attention", "ColumnLinear", "DecoderLayer", "Embedding", "GatedMLP", "Linear", "MergedColumnLinear",
           "Module", "ModuleList", "ParallelLMHead", "Parameter", "QKVColumnLinear", "RMSNorm", "RowLinear", "default_weight_loader",
           "tp_shard"]
