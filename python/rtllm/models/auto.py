"""AutoModelForCausalLM: the registered class of a checkpoint's architecture (config.json's "architectures",
else its "model_type")."""

from .registry import resolve_hf_model


class AutoModelForCausalLM:
    @staticmethod
    def from_hugging_face(model_dir: str, dtype: str = "auto", mapping=None):
        model_class, _ = resolve_hf_model(str(model_dir))  # raises for an unknown architecture, listing the known ones
        return model_class.from_hugging_face(model_dir, dtype=dtype, mapping=mapping)
