"""DecoderLayer: the pre-norm transformer block of the Llama family.

h = h + attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h)). The build pass
fuse_add_rms_norm turns each residual add + the next norm into one add_rms_norm op.
"""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from .attention import Attention
from .mlp import GatedMLP
from .module import Module
from .normalization import RMSNorm


class DecoderLayer(Module):
    """`config` has the fields of rtllm.models.ModelConfig; attention_scale None is head_dim ** -0.5."""

    def __init__(self, config, layer_idx: int, mapping: Mapping | None = None, attention_scale: float | None = None):
        c, dt = config, config.dtype
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, layer_idx,
                                   qkv_bias=c.attention_bias, o_bias=c.o_bias,
                                   qk_norm_eps=c.rms_norm_eps if c.qk_norm else None, scale=attention_scale,
                                   dtype=dt, mapping=mapping)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, False, dt, mapping)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dt)

    def forward(self, h: Tensor, positions: Tensor, inv_freq: Parameter) -> Tensor:
        h = F.add(h, self.self_attn(self.input_layernorm(h), positions, inv_freq))
        return F.add(h, self.mlp(self.post_attention_layernorm(h)))
