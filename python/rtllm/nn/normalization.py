"""RMSNorm over each run of `dim` values of the last axis (dim = hidden size, or head_dim for q/k norms)."""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from .module import Module


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float, dtype: str = "float32"):
        self.weight = Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)
