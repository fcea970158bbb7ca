"""GatedMLP: down_proj(silu(gate_proj(x)) * up_proj(x)), with gate and up as one linear."""

from ..builder import functional as F
from ..builder.tensor import Tensor
from ..mapping import Mapping
from .linear import MergedColumnLinear, RowLinear
from .module import Module


class GatedMLP(Module):
    """Weights: gate_up_proj [2 I, H] (rows: gate_proj, then up_proj), down_proj [H, I]."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, dtype: str = "float32",
                 mapping: Mapping | None = None):
        self.gate_up_proj = MergedColumnLinear(hidden_size, [intermediate_size] * 2, bias, dtype, mapping)
        self.down_proj = RowLinear(intermediate_size, hidden_size, bias, dtype, mapping)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu_mul(self.gate_up_proj(x)))  # [T, 2 I] -> [T, I] -> [T, H]
