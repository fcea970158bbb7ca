"""ModelConfig: the Llama-family hyper-parameters, and the parsing of a HF config.json shared by the
architectures (each model file adds its own fields and flags: rtllm.models.registry)."""

import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

_DTYPE_NAMES = {"float32": "float32", "float": "float32", "float16": "float16", "half": "float16",
                "bfloat16": "bfloat16"}


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    tie_word_embeddings: bool
    attention_bias: bool       # bias on q/k/v
    o_bias: bool               # bias on o_proj (Llama/Qwen3 with attention_bias)
    qk_norm: bool              # per-head RMSNorm of q and k before RoPE (Qwen3)
    dtype: str                 # weight dtype: float32, float16 or bfloat16
    bos_token_id: int          # -1 when the model has none
    eos_token_id: list
    sliding_window: int | None = None  # only full attention is supported (see build)

    def to_json(self) -> dict:
        return asdict(self)

    def rope_inv_freq(self) -> np.ndarray:
        """[head_dim / 2] float32, scaling applied; computed in float64 and rounded once."""
        dim = self.head_dim
        inv_freq = 1.0 / self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.rope_scaling is not None:  # llama3: keep high frequencies, divide low ones, blend between
            s = self.rope_scaling
            factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
            old_len = s["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv_freq
            scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
            inv_freq = np.where(medium, smoothed, scaled)
        return inv_freq.astype(np.float32)


def read_json(path: str) -> dict:
    """A JSON file's content; ValueError naming the file when it is not valid JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _rope(hf: dict, path: str) -> tuple:
    """(rope_theta, rope_scaling) from either transformers 4 keys (rope_theta, rope_scaling) or
    transformers 5 ones (rope_parameters {rope_theta, rope_type, ...})."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", scaling.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported (supported: default, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    missing = [k for k in keys if k not in merged]
    if missing:
        raise ValueError(f"{path}: llama3 rope scaling lacks {', '.join(missing)}")
    scaling = {"rope_type": "llama3", **{k: float(merged[k]) for k in keys},
               "original_max_position_embeddings": int(merged.get("original_max_position_embeddings",
                                                                  hf["max_position_embeddings"]))}
    return float(theta), scaling


def sliding_window_of(hf: dict) -> int | None:
    if hf.get("use_sliding_window") is False or hf.get("sliding_window") is None:
        return None
    layer_types = hf.get("layer_types")
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(hf["sliding_window"])


def _eos_ids(hf: dict, model_dir: str) -> list:
    eos = hf.get("eos_token_id")
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.exists(gen_path):
        gen_eos = read_json(gen_path).get("eos_token_id")
        eos = gen_eos if gen_eos is not None else eos
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def read_hf_config(model_dir: str) -> tuple:
    """(config.json as a dict, its path)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"no config.json in {model_dir}: not a Hugging Face checkpoint directory")
    return read_json(path), path


def parse_llama_family(hf: dict, path: str, model_dir: str, architecture: str, *, attention_bias: bool,
                       o_bias: bool, qk_norm: bool = False, sliding_window: int | None = None,
                       config_class: type = ModelConfig, **extra_fields) -> ModelConfig:
    """The fields every Llama-like config.json shares; the architecture gives its flags (and a subclass of
    ModelConfig with its extra fields)."""
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{path}: mlp_bias is not supported")
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    dtype_name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch.")
    if dtype_name not in _DTYPE_NAMES:
        raise ValueError(f"{path}: dtype {dtype_name!r} is not supported (float32, float16, bfloat16)")
    rope_theta, rope_scaling = _rope(hf, path)
    bos = hf.get("bos_token_id")
    return config_class(
        architecture=architecture,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        intermediate_size=int(hf["intermediate_size"]),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        dtype=_DTYPE_NAMES[dtype_name],
        bos_token_id=-1 if bos is None else int(bos),
        eos_token_id=_eos_ids(hf, model_dir),
        sliding_window=sliding_window,
        **extra_fields,
    )
