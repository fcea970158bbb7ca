"""The model registry: architecture name (config.json's "architectures") -> model class.

Each architecture file registers its class with @register_model("XForCausalLM", model_type="x"); the
model_type is the fallback for a config.json without "architectures", as in transformers.
"""
from ..quantization.prequantized import detect
from .config import ModelConfig, read_hf_config

_MODEL_CLASSES: dict = {}   # architecture -> class
_MODEL_TYPES: dict = {}     # model_type -> architecture


def register_model(architecture: str, model_type: str):
    def register(cls):
        if architecture in _MODEL_CLASSES or model_type in _MODEL_TYPES:
            raise ValueError(f"architecture {architecture!r} (model_type {model_type!r}) is registered twice")
        cls.architecture = architecture
        _MODEL_CLASSES[architecture] = cls
        _MODEL_TYPES[model_type] = architecture
        return cls
    return register


def supported_architectures() -> tuple:
    return tuple(_MODEL_CLASSES)


def model_class(hf: dict, path: str) -> type:
    """The registered class for a parsed config.json: the first known name in "architectures", or, when
    there is none, the one of its "model_type"."""
    architectures = hf.get("architectures") or []
    if not architectures:
        model_type = hf.get("model_type")
        if model_type not in _MODEL_TYPES:
            raise ValueError(f"{path}: no architectures, and model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(_MODEL_TYPES)}")
        return _MODEL_CLASSES[_MODEL_TYPES[model_type]]
    known = [a for a in architectures if a in _MODEL_CLASSES]
    if not known:
        raise ValueError(f"{path}: architectures {architectures} not supported; supported: "
                         f"{', '.join(_MODEL_CLASSES)}")
    return _MODEL_CLASSES[known[0]]


def resolve_hf_model(model_dir: str) -> tuple:
    """(model class, ModelConfig) of a checkpoint directory: config.json (and generation_config.json's eos
    ids when present) parsed as its architecture parses it. Pre-quantized checkpoints other than the FP8
    layouts of rtllm.quantization.prequantized are refused."""
    hf, path = read_hf_config(str(model_dir))
    detect(hf, path, str(model_dir))
    cls = model_class(hf, path)
    return cls, cls.config_from_hf(hf, path, str(model_dir))


def parse_hf_config(model_dir: str) -> ModelConfig:
    return resolve_hf_model(model_dir)[1]
