"""LlamaForCausalLM: Llama 2/3 (llama3 rope scaling), and the base of the other Llama-like architectures.

forward() is the only definition of the network; the build pass fuses residual adds with the next norm.
"""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from ..nn import DecoderLayer, Embedding, Module, ModuleList, ParallelLMHead, RMSNorm
from .base import CausalLM
from .config import ModelConfig, parse_llama_family
from .registry import register_model


class LlamaModel(Module):
    def __init__(self, config: ModelConfig, mapping: Mapping, attention_scale: float | None):
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, config.dtype, mapping)
        self.layers = ModuleList(DecoderLayer(config, i, mapping, attention_scale) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.dtype)


class RotaryEmbedding(Module):
    def __init__(self, config: ModelConfig):
        # float32 in every engine dtype; computed from the config, not read from the checkpoint
        self.inv_freq = Parameter((config.head_dim // 2,), "float32", config.rope_inv_freq)


@register_model("LlamaForCausalLM", model_type="llama")
class LlamaForCausalLM(CausalLM):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def config_from_hf(cls, hf: dict, path: str, model_dir: str) -> ModelConfig:
        return parse_llama_family(hf, path, model_dir, cls.architecture, **cls.architecture_fields(hf, path))

    @classmethod
    def architecture_fields(cls, hf: dict, path: str) -> dict:
        """What the Llama-like architectures read differently: biases, q/k norm, sliding window (and a
        ModelConfig subclass with extra fields)."""
        bias = bool(hf.get("attention_bias", False))  # on q/k/v and o_proj alike
        return dict(attention_bias=bias, o_bias=bias)

    def __init__(self, config: ModelConfig, mapping: Mapping | None = None, attention_scale: float | None = None):
        mapping = mapping or Mapping()
        self.config = config
        self.mapping = mapping
        self.source_dir = None
        self.model = LlamaModel(config, mapping, attention_scale)
        self.rope = RotaryEmbedding(config)
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, config.dtype, mapping)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: Tensor, positions: Tensor, logits_indices: Tensor) -> Tensor:
        m = self.model
        h = m.embed_tokens(input_ids)  # [T, H]
        for layer in m.layers:
            h = layer(h, positions, self.rope.inv_freq)
        h = F.gather_rows(m.norm(h), logits_indices)  # [R, H]: the rows whose logits are wanted
        return self.lm_head(h)  # [R, V] (under tensor parallelism on rank 0; see ParallelLMHead)
