"""GraniteForCausalLM (IBM Granite 3): Llama with four constant multipliers (transformers' GraniteConfig).

The multipliers are folded into weights at load, so the graph is Llama's (no scale op): the embedding
table is multiplied by embedding_multiplier, o_proj and down_proj (each branch added to the residual) by
residual_multiplier, and the LM head by 1 / logits_scaling; attention_multiplier replaces head_dim ** -0.5
as the attention scale. With tied embeddings the LM head becomes its own scaled copy of the table.
"""
from dataclasses import dataclass

import numpy as np

from ..builder.safetensors_io import cast, to_float32
from ..builder.tensor import Parameter
from ..mapping import Mapping
from ..nn import ParallelLMHead
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .registry import register_model


@dataclass
class GraniteConfig(ModelConfig):
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0


def scale_weight(param: Parameter, factor: float) -> None:
    """Makes `param` load as factor * its data: computed in float32, rounded once to its dtype."""
    if factor == 1.0:
        return
    load, dtype = param.loader, param.dtype
    param.loader = lambda: cast(to_float32(load(), dtype) * np.float32(factor), "float32", dtype)


@register_model("GraniteForCausalLM", model_type="granite")
class GraniteForCausalLM(LlamaForCausalLM):
    @classmethod
    def architecture_fields(cls, hf: dict, path: str) -> dict:
        multipliers = {k: float(hf.get(k, 1.0)) for k in ("embedding_multiplier", "residual_multiplier",
                                                          "attention_multiplier", "logits_scaling")}
        if multipliers["logits_scaling"] == 0.0:
            raise ValueError(f"{path}: logits_scaling=0 (logits are divided by it)")
        return {**super().architecture_fields(hf, path), "config_class": GraniteConfig, **multipliers}

    def __init__(self, config: GraniteConfig, mapping: Mapping | None = None):
        super().__init__(config, mapping, attention_scale=config.attention_multiplier)
        if config.tie_word_embeddings:  # the head is scaled differently from the table
            self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, config.dtype, self.mapping)

    def checkpoint_name(self, name: str) -> str:
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return "model.embed_tokens.weight"
        return name

    def process_weights_after_loading(self) -> None:
        c = self.config
        scale_weight(self.model.embed_tokens.weight, c.embedding_multiplier)
        for layer in self.model.layers:
            for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
                for param in (linear.weight, linear.bias):
                    if param is not None:
                        scale_weight(param, c.residual_multiplier)
        scale_weight(self.lm_head.weight, 1.0 / c.logits_scaling)
