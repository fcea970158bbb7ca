"""AutoModelForCausalLM: picks the model class from config.json's "architectures"."""

from .config import SUPPORTED_ARCHITECTURES, parse_hf_config
from .llama import LlamaForCausalLM

MODEL_CLASSES = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}


class AutoModelForCausalLM:
    @staticmethod
    def from_hugging_face(model_dir: str, dtype: str = "auto"):
        config = parse_hf_config(str(model_dir))  # raises for an unknown architecture, listing the known ones
        return MODEL_CLASSES[config.architecture].from_hugging_face(model_dir, dtype=dtype)
