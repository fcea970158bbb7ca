"""Embedding: a lookup table [vocab_size, hidden_size], and the LM head over the same vocabulary. Under tensor
parallelism each rank holds a contiguous slice of the vocabulary (vocab-parallel, as TensorRT-LLM's and vLLM's
embeddings): the embedding looks up the ids in its slice, writes zeros for the others, and an all-reduce
sums the ranks' rows; the LM head computes its slice's logits, gathered on rank 0. A vocabulary that does
not split evenly is padded with rows of zeros up to a multiple of tp_size (ids never reach them; their
logits are dropped after the gather)."""

import numpy as np

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from .linear import ColumnLinear, tp_shard
from .module import Module, check_loaded_shape


def padded_vocab_size(vocab_size: int, mapping: Mapping) -> int:
    """vocab_size rounded up to a multiple of tp_size, so that every rank holds as many rows."""
    return -(-vocab_size // mapping.tp_size) * mapping.tp_size


def _vocab_shard_loader(param: Parameter, loaded: Parameter, vocab_size: int, mapping: Mapping) -> None:
    """param.loader: this rank's rows of the checkpoint's [vocab_size, H] table, zero rows appended first."""
    check_loaded_shape(loaded, (vocab_size, param.shape[1]))
    cast = loaded.cast(param.dtype)
    padded = param.shape[0] * mapping.tp_size

    def load():
        table = cast.load()
        if padded != vocab_size:
            table = np.concatenate([table, np.zeros((padded - vocab_size, *table.shape[1:]), table.dtype)])
        return tp_shard(table, 0, mapping)

    param.loader = load


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32",
                 mapping: Mapping | None = None):
        self.mapping = mapping or Mapping()
        self.num_embeddings = num_embeddings
        rows = padded_vocab_size(num_embeddings, self.mapping) // self.mapping.tp_size
        self.weight = Parameter((rows, embedding_dim), dtype)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: Parameter, loaded: Parameter) -> None:
        _vocab_shard_loader(param, loaded, self.num_embeddings, self.mapping)

    def forward(self, ids: Tensor) -> Tensor:
        if self.mapping.tp_size == 1:
            return F.embedding(ids, self.weight)  # [T] -> [T, H]
        return F.all_reduce(F.embedding(ids, self.weight, vocab_parallel=True))


class ParallelLMHead(ColumnLinear):
    """logits = x W^T over the vocabulary, W [vocab_size, hidden_size] (no bias). Under tensor parallelism each
    rank computes its slice of the (padded) vocabulary, gathered on rank 0, then the padding columns are
    dropped, so the output is [R, vocab_size] on rank 0 whatever tp_size."""

    def __init__(self, hidden_size: int, vocab_size: int, dtype: str = "float32", mapping: Mapping | None = None):
        mapping = mapping or Mapping()
        self.vocab_size = vocab_size
        padded = padded_vocab_size(vocab_size, mapping)
        super().__init__(hidden_size, padded, False, dtype, mapping)
        self.vocab_index = None  # the columns kept after the gather, when the vocabulary was padded
        if padded != vocab_size:
            self.vocab_index = Parameter((vocab_size,), "int32", lambda: np.arange(vocab_size, dtype=np.int32))
            self.vocab_index.keep_dtype = True

    def weight_loader(self, param: Parameter, loaded: Parameter) -> None:
        _vocab_shard_loader(param, loaded, self.vocab_size, self.mapping)

    def forward(self, x: Tensor) -> Tensor:
        logits = super().forward(x)  # [R, V / tp_size]: this rank's slice of the vocabulary
        if self.mapping.tp_size == 1:
            return logits
        logits = F.gather(logits, self.mapping.tp_size)
        return logits if self.vocab_index is None else F.gather_columns(logits, self.vocab_index)
