"""MistralForCausalLM: Llama without biases, with a sliding window (full attention while it never slides)."""

from .config import sliding_window_of
from .llama import LlamaForCausalLM
from .registry import register_model


@register_model("MistralForCausalLM", model_type="mistral")
class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def architecture_fields(cls, hf: dict, path: str) -> dict:
        return dict(attention_bias=False, o_bias=False, sliding_window=sliding_window_of(hf))
