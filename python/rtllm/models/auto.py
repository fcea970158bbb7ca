"""AutoModelForCausalLM: the registered class of a checkpoint's architecture (config.json's "architectures",
else its "model_type"), or of a GGUF file's general.architecture (rtllm.models.gguf)."""

from .registry import resolve_hf_model


class AutoModelForCausalLM:
    @staticmethod
    def from_hugging_face(model_dir: str, dtype: str = "auto", mapping=None):
        """`model_dir`: an HF checkpoint directory, or a GGUF file (a *.gguf path, or a directory without
        config.json holding exactly one)."""
        from .gguf import model_from_gguf, resolve_gguf

        gguf_path = resolve_gguf(str(model_dir))
        if gguf_path is not None:
            return model_from_gguf(gguf_path, dtype=dtype, mapping=mapping)
        model_class, _ = resolve_hf_model(str(model_dir))  # raises for an unknown architecture, listing the known ones
        return model_class.from_hugging_face(model_dir, dtype=dtype, mapping=mapping)

    @staticmethod
    def from_gguf(path: str, dtype: str = "auto", mapping=None):
        """The model of a GGUF file, its weights dequantized to float32 when read."""
        from .gguf import model_from_gguf

        return model_from_gguf(str(path), dtype=dtype, mapping=mapping)
