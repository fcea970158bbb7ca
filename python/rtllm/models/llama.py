"""LlamaForCausalLM: Llama 2/3 (llama3 rope scaling), Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm).

forward() is the only definition of the network; build passes fuse its parts.
"""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..nn import Embedding, Linear, Module, ModuleList, RMSNorm
from .checkpoint import Checkpoint
from .config import ModelConfig, parse_hf_config


class Attention(Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        c, dt = config, config.dtype
        self.config, self.layer_idx = config, layer_idx
        self.q_proj = Linear(c.hidden_size, c.num_heads * c.head_dim, c.attention_bias, dt)
        self.k_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dt)
        self.v_proj = Linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.attention_bias, dt)
        self.o_proj = Linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dt)
        if c.qk_norm:  # one [head_dim] weight shared by all heads
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dt)

    def forward(self, x: Tensor, positions: Tensor, inv_freq: Parameter) -> Tensor:
        c = self.config
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [T, nh*hd], [T, nkv*hd] x 2
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = F.rope(q, positions, inv_freq, c.head_dim), F.rope(k, positions, inv_freq, c.head_dim)
        out = F.attention(q, k, v, layer_idx=self.layer_idx, num_heads=c.num_heads, num_kv_heads=c.num_kv_heads,
                          head_dim=c.head_dim, scale=c.head_dim ** -0.5)
        return self.o_proj(out)


class MLP(Module):
    def __init__(self, config: ModelConfig):
        c = config
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, False, c.dtype)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, False, c.dtype)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, False, c.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.mul(F.silu(self.gate_proj(x)), self.up_proj(x)))


class DecoderLayer(Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)

    def forward(self, h: Tensor, positions: Tensor, inv_freq: Parameter) -> Tensor:
        h = F.add(h, self.self_attn(self.input_layernorm(h), positions, inv_freq))
        return F.add(h, self.mlp(self.post_attention_layernorm(h)))


class LlamaModel(Module):
    def __init__(self, config: ModelConfig):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.dtype)
        self.layers = ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)


class RotaryEmbedding(Module):
    def __init__(self, config: ModelConfig):
        # float32 in every engine dtype; computed from the config, not read from the checkpoint
        self.inv_freq = Parameter((config.head_dim // 2,), "float32", config.rope_inv_freq)


class LlamaForCausalLM(Module):
    def __init__(self, config: ModelConfig):
        self.config = config
        self.source_dir = None
        self.model = LlamaModel(config)
        self.rope = RotaryEmbedding(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, False, config.dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor, last_token_ids: Tensor) -> Tensor:
        m = self.model
        h = m.embed_tokens(input_ids)  # [T, H]
        for layer in m.layers:
            h = layer(h, positions, self.rope.inv_freq)
        h = F.gather_rows(m.norm(h), last_token_ids)  # [R, H]
        return self.lm_head(h)  # [R, V]

    @classmethod
    def from_hugging_face(cls, model_dir: str, dtype: str = "auto") -> "LlamaForCausalLM":
        """Reads config.json and maps every parameter to its checkpoint tensor (lazily, no data read).
        dtype "auto" keeps the checkpoint's dtype; float32/float16/bfloat16 convert on load."""
        config = parse_hf_config(str(model_dir))
        if dtype != "auto":
            if dtype not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"dtype {dtype!r} is not supported: use auto, float32, float16 or bfloat16")
            config.dtype = dtype
        model = cls(config)
        model.source_dir = str(model_dir)  # tokenizer files are copied from here into engines
        checkpoint = Checkpoint(str(model_dir))
        for name, param in model.named_parameters():
            if param.loader is not None:  # computed, e.g. rope.inv_freq
                continue
            loaded = checkpoint.parameter(name, param.shape).cast(param.dtype)
            param.loader = loaded.load
        return model

