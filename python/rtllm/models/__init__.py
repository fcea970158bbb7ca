"""Model definitions (one file per architecture, registered by name) and HF checkpoint reading."""

from .auto import AutoModelForCausalLM
from .base import CausalLM
from .config import ModelConfig
from .llama import LlamaForCausalLM
from .mistral import MistralForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen3 import Qwen3ForCausalLM
from .granite import GraniteConfig, GraniteForCausalLM
from .registry import parse_hf_config, register_model, supported_architectures

__all__ = ["AutoModelForCausalLM", "CausalLM", "GraniteConfig", "GraniteForCausalLM", "LlamaForCausalLM",
           "MistralForCausalLM", "ModelConfig", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "parse_hf_config",
           "register_model", "supported_architectures"]
