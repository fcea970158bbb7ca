"""Embedding: a lookup table [vocab_size, hidden_size]. Under tensor parallelism each rank holds a contiguous
slice of the vocabulary (vocab-parallel, as TensorRT-LLM's and vLLM's embeddings): it looks up the ids in its
slice, writes zeros for the others, and an all-reduce sums the ranks' rows."""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from .linear import tp_divide, tp_shard
from .module import Module, check_loaded_shape


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32",
                 mapping: Mapping | None = None):
        self.mapping = mapping or Mapping()
        rows = tp_divide(num_embeddings, self.mapping.tp_size, "vocab_size")
        self.weight = Parameter((rows, embedding_dim), dtype)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: Parameter, loaded: Parameter) -> None:
        check_loaded_shape(loaded, (param.shape[0] * self.mapping.tp_size, param.shape[1]))
        cast = loaded.cast(param.dtype)
        param.loader = lambda: tp_shard(cast.load(), 0, self.mapping)

    def forward(self, ids: Tensor) -> Tensor:
        if self.mapping.tp_size == 1:
            return F.embedding(ids, self.weight)  # [T] -> [T, H]
        return F.all_reduce(F.embedding(ids, self.weight, vocab_parallel=True))
