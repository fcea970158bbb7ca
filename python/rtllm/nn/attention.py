"""Attention: fused qkv projection -> paged causal attention (RoPE and the optional per-head q/k RMSNorm
applied inside the op) -> output projection."""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from .linear import QKVColumnLinear, RowLinear, tp_divide, kv_head_replicas
from .module import Module
from .normalization import RMSNorm


class Attention(Module):
    """Weights: qkv_proj [(nh + 2 nkv) hd, H] (from q_proj, k_proj, v_proj), o_proj [H, nh hd], and with
    qk_norm_eps set q_norm / k_norm [hd] (Qwen3). scale multiplies q.k (head_dim ** -0.5 by default)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None,
                 scale: float | None = None, dtype: str = "float32", mapping: Mapping | None = None):
        mapping = mapping or Mapping()
        # this rank's heads: its share of the query heads, and the KV heads they read
        self.num_heads = tp_divide(num_heads, mapping.tp_size, "num_heads")
        self.num_kv_heads = num_kv_heads * kv_head_replicas(num_kv_heads, mapping) // mapping.tp_size
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.qk_norm_eps = qk_norm_eps
        self.qkv_proj = QKVColumnLinear(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, dtype, mapping)
        self.o_proj = RowLinear(num_heads * head_dim, hidden_size, o_bias, dtype, mapping)
        if qk_norm_eps is not None:  # one [head_dim] weight shared by all heads
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, dtype)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, dtype)

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Parameter) -> Tensor:
        qkv = self.qkv_proj(x)  # [T, (nh + 2 nkv) hd]
        qk_norm = (self.q_norm.weight, self.k_norm.weight, self.qk_norm_eps) if self.qk_norm_eps is not None else None
        out = F.attention(qkv, positions, inv_freq, qk_norm, layer_idx=self.layer_idx, num_heads=self.num_heads,
                          num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, scale=self.scale)  # [T, nh hd]
        return self.o_proj(out)
