"""Qwen3ForCausalLM: Llama with a per-head RMSNorm of q and k before RoPE (q_norm, k_norm [head_dim])."""

from .config import sliding_window_of
from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("Qwen3ForCausalLM", model_type="qwen3")
class Qwen3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def architecture_fields(cls, hf: dict, path: str) -> dict:
        return {**super().architecture_fields(hf, path), "qk_norm": True, "sliding_window": sliding_window_of(hf)}
