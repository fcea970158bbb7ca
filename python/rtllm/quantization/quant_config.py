"""QuantConfig: how an engine's weights (and KV cache) are quantized; fields as in TensorRT-LLM's QuantConfig.

Written to the engine's config.json as its "quantization" section (to_dict) and read back (from_dict).
"""
import dataclasses
from dataclasses import dataclass, field

from .mode import GROUPWISE_QUANT_ALGOS, KV_CACHE_QUANT_ALGO_LIST, QuantAlgo

_GROUP_SIZES = (32, 64, 128)
# GPTQ also quantizes per output channel: group_size -1 (one group over all K input channels).
_GPTQ_ALGOS = (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ)
PER_CHANNEL = -1


def _algo(name: str, value) -> QuantAlgo | None:
    if value is None or isinstance(value, QuantAlgo):
        return value
    if isinstance(value, str) and value in QuantAlgo.__members__:
        return QuantAlgo(value)
    raise ValueError(f"QuantConfig.{name}={value!r} is not a QuantAlgo; known: {', '.join(QuantAlgo.__members__)}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"QuantConfig.{name}={value!r} must be a positive integer")


@dataclass
class QuantConfig:
    """quant_algo None (or NO_QUANT) keeps the weights unquantized; kv_cache_quant_algo None keeps the KV
    cache in the activation dtype. exclude_modules are globs over module names (lm_head, model.layers.*.mlp.*)
    that stay unquantized. The calib_* fields drive calibration of algorithms that need activations (FP8,
    an FP8 KV cache): calib_size samples of at most calib_max_seq_length tokens from calib_dataset, a .txt
    or .jsonl file (rtllm.quantization.calibration.load_calib_texts); rtllm downloads no dataset, and the
    default name "cnn_dailymail" calibrates on the English corpus shipped with rtllm. W4A16_AWQ, W4A16_GPTQ and
    W8A16_GPTQ calibrate too (per-linear input statistics); GPTQ also takes group_size -1 (per output channel)
    and desc_act (columns by decreasing Hessian diagonal, groups kept in column order)."""
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list = field(default_factory=lambda: ["lm_head"])
    calib_size: int = 512
    calib_max_seq_length: int = 512
    calib_dataset: str = "cnn_dailymail"
    desc_act: bool = False  # GPTQ: columns in decreasing order of the Hessian diagonal (groups stay static)

    def __post_init__(self):
        self.quant_algo = _algo("quant_algo", self.quant_algo)
        self.kv_cache_quant_algo = _algo("kv_cache_quant_algo", self.kv_cache_quant_algo)
        if self.kv_cache_quant_algo not in (None, QuantAlgo.NO_QUANT, *KV_CACHE_QUANT_ALGO_LIST):
            raise ValueError(f"QuantConfig.kv_cache_quant_algo={self.kv_cache_quant_algo.value} cannot store a KV "
                             f"cache; use one of {', '.join(a.value for a in KV_CACHE_QUANT_ALGO_LIST)}")
        gptq = self.quant_algo in _GPTQ_ALGOS
        for name in ("group_size", "calib_size", "calib_max_seq_length"):
            if not (name == "group_size" and gptq and self.group_size == PER_CHANNEL):
                _positive_int(name, getattr(self, name))
        if self.quant_algo in GROUPWISE_QUANT_ALGOS and self.group_size not in _GROUP_SIZES + (PER_CHANNEL,) * gptq:
            raise ValueError(f"QuantConfig.group_size={self.group_size} is not one of "
                             f"{', '.join(map(str, _GROUP_SIZES + (PER_CHANNEL,) * gptq))} (needed by "
                             f"{self.quant_algo.value}{'; -1 is per channel' if gptq else ''})")
        if isinstance(self.smoothquant_val, bool) or not isinstance(self.smoothquant_val, (int, float)) \
                or not 0.0 <= self.smoothquant_val <= 1.0:
            raise ValueError(f"QuantConfig.smoothquant_val={self.smoothquant_val!r} must be in [0, 1]")
        for name in ("has_zero_point", "pre_quant_scale", "desc_act"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"QuantConfig.{name}={getattr(self, name)!r} must be a bool")
        if not isinstance(self.exclude_modules, (list, tuple)) or \
                not all(isinstance(m, str) and m for m in self.exclude_modules):
            raise ValueError(f"QuantConfig.exclude_modules={self.exclude_modules!r} must be a list of module "
                             f"name globs")
        self.exclude_modules = list(self.exclude_modules)
        if self.desc_act and not gptq:
            raise ValueError(f"QuantConfig.desc_act=True orders GPTQ's columns; quant_algo "
                             f"{self.quant_algo and self.quant_algo.value} is not W4A16_GPTQ or W8A16_GPTQ")
        if not isinstance(self.calib_dataset, str) or not self.calib_dataset:
            raise ValueError(f"QuantConfig.calib_dataset={self.calib_dataset!r} must be a dataset name")

    @property
    def quantizes_weights(self) -> bool:
        return self.quant_algo not in (None, QuantAlgo.NO_QUANT)

    @property
    def quantizes_kv_cache(self) -> bool:
        return self.kv_cache_quant_algo not in (None, QuantAlgo.NO_QUANT)

    def to_dict(self) -> dict:
        """JSON-ready: algorithms by name (null when unset)."""
        d = dataclasses.asdict(self)
        for name in ("quant_algo", "kv_cache_quant_algo"):
            d[name] = None if d[name] is None else d[name].value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        """The inverse of to_dict; absent keys take their defaults, unknown ones are refused."""
        if not isinstance(d, dict):
            raise ValueError(f"a quantization config must be a JSON object, got {d!r}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {', '.join(unknown)}")
        return cls(**d)
