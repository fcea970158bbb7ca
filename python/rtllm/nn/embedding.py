"""Embedding: a lookup table [vocab_size, hidden_size] (every rank holds it whole)."""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from .module import Module


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32"):
        self.weight = Parameter((num_embeddings, embedding_dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)  # [T] -> [T, H]
