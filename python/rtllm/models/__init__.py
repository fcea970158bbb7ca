"""Model definitions and HF checkpoint reading."""

from .auto import AutoModelForCausalLM
from .config import ModelConfig, parse_hf_config
from .llama import LlamaForCausalLM

__all__ = ["AutoModelForCausalLM", "LlamaForCausalLM", "ModelConfig", "parse_hf_config"]
