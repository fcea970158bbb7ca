"""CausalLM: what every registered architecture shares: from_hugging_face (config parsing through the
registry, checkpoint loading through the parameters' loader hooks) and the hooks an architecture overrides."""

from ..builder.build import DTYPES
from ..mapping import Mapping
from ..nn import Module
from ..quantization.prequantized import load_prequantized, scheme_of
from .checkpoint import Checkpoint, load_weights
from .config import ModelConfig
from .registry import resolve_hf_model


class CausalLM(Module):
    """Subclasses register themselves (rtllm.models.registry.register_model), set `architecture`, and define
    config_from_hf, __init__(config, mapping) and forward(input_ids, positions, logits_indices) -> logits."""
    architecture: str = ""
    # checkpoint module name -> (module of this model, shard id): tensors stacked into one parameter
    packed_modules_mapping: dict = {}
    # rtllm.quantization.prequantized.PrequantizedModel when loaded from a pre-quantized FP8 checkpoint
    prequantized = None

    @classmethod
    def config_from_hf(cls, hf: dict, path: str, model_dir: str) -> ModelConfig:
        raise NotImplementedError

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint tensor a parameter (or, for stacked ones, its parts' parent) is read from."""
        return name

    def process_weights_after_loading(self) -> None:
        """Changes the loaded weights (still lazily), e.g. folds constant multipliers into them."""

    @classmethod
    def from_hugging_face(cls, model_dir: str, dtype: str = "auto", mapping: Mapping | None = None) -> "CausalLM":
        """Reads config.json and maps every parameter to its checkpoint tensors (lazily, no data read).
        dtype "auto" keeps the checkpoint's dtype; float32/float16/bfloat16 convert on load."""
        model_dir = str(model_dir)
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported: use {', '.join(DTYPES)}")
        found, config = resolve_hf_model(model_dir)
        if not issubclass(found, cls):
            raise ValueError(f"{model_dir} holds a {found.architecture}, not a {cls.architecture or cls.__name__}")
        if dtype != "auto":
            config.dtype = dtype
        model = found(config, mapping)
        model.source_dir = model_dir  # tokenizer files are copied from here into engines
        checkpoint = Checkpoint(model_dir)
        scheme = scheme_of(model_dir)
        if scheme is not None:  # its FP8 linears first; load_weights then skips them
            model.prequantized = load_prequantized(model, checkpoint, scheme)
        load_weights(model, checkpoint)
        model.process_weights_after_loading()
        return model
