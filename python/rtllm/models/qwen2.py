"""Qwen2ForCausalLM: Llama with a bias on q/k/v (always, no flag) and none on o_proj."""

from .config import sliding_window_of
from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("Qwen2ForCausalLM", model_type="qwen2")
class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def architecture_fields(cls, hf: dict, path: str) -> dict:
        return dict(attention_bias=True, o_bias=False, sliding_window=sliding_window_of(hf))  # no flag
