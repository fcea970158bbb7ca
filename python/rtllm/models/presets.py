"""Named model shapes and random-weight checkpoints of them, for benchmarks and demos (no download).

`write_random_checkpoint(path, "llama-3-8b", dtype="bfloat16")` writes an HF-style checkpoint
(config.json + model.safetensors) that both rtllm and HF transformers load; with tokenizer=True also a
placeholder word-level tokenizer whose token i reads "t<i>", so every id of the vocabulary decodes
(for serving benchmarks, where the server streams text). Weights are seeded uniform
noise with the usual initializer's standard deviation (never zeros: zeros hide wrong indexing and run
unrealistically fast), written tensor by tensor, so an 8B model never sits in host memory whole.
"""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..builder.safetensors_io import cast, write_safetensors

PRESETS = {
    # Meta Llama 3 8B shapes.
    "llama-3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False),
    # Meta Llama 3.2 1B shapes (tied embeddings, head_dim 64).
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    # A ~30M-parameter Llama that a CPU runs at interactive speed.
    "llama-30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, intermediate_size=1408, vocab_size=8192,
                      rope_theta=10000.0, max_position_embeddings=2048, tie_word_embeddings=False),
}


def hf_config(preset: str, dtype: str = "bfloat16", **overrides) -> dict:
    """The HF config.json dict of a named preset (LlamaForCausalLM)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                  rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False, bos_token_id=1,
                  eos_token_id=2, torch_dtype=dtype, initializer_range=0.02)
    config.update(PRESETS[preset])
    config.update(overrides)
    return config


def _parameter_shapes(config: dict):
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    yield "model.embed_tokens.weight", (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "self_attn.q_proj.weight", (heads * head_dim, hidden)
        yield p + "self_attn.k_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.v_proj.weight", (kv_heads * head_dim, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim)
        yield p + "post_attention_layernorm.weight", (hidden,)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
    yield "model.norm.weight", (hidden,)
    if not config.get("tie_word_embeddings", False):
        yield "lm_head.weight", (config["vocab_size"], hidden)


def _random_tensor(shape, dtype: str, seed, centre: float, spread: float) -> np.ndarray:
    """centre + uniform noise of standard deviation `spread`, drawn in row chunks on several threads
    (numpy's generators and ufuncs release the GIL), so an 8B checkpoint takes seconds, not minutes."""
    rows = shape[0]
    out = np.empty(shape, dtype=np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
    half_width = spread * np.sqrt(3.0)  # uniform on [-a, a] has standard deviation a / sqrt(3)
    num_chunks = max(1, min(64, rows // 256))
    bounds = np.linspace(0, rows, num_chunks + 1).astype(int)

    def fill(chunk):
        lo, hi = bounds[chunk], bounds[chunk + 1]
        rng = np.random.default_rng([*seed, chunk])
        values = rng.random((hi - lo,) + tuple(shape[1:]), dtype=np.float32)
        values = (values * np.float32(2 * half_width) + np.float32(centre - half_width))
        out[lo:hi] = cast(values, "float32", dtype)

    with ThreadPoolExecutor(max_workers=min(num_chunks, os.cpu_count() or 1)) as pool:
        list(pool.map(fill, range(num_chunks)))
    return out


def write_placeholder_tokenizer(path, vocab_size: int, bos_token_id: int = 1, eos_token_id: int = 2) -> None:
    """tokenizer.json (word level, token i is "t<i>") and tokenizer_config.json naming the BOS and EOS
    tokens, with a plain chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=f"t{eos_token_id}"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": f"t{bos_token_id}",
              "eos_token": f"t{eos_token_id}",
              "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def write_random_checkpoint(path, preset: str | dict, dtype: str = "bfloat16", seed: int = 0,
                            tokenizer: bool = False) -> str:
    """Writes config.json and model.safetensors with random weights (and, with `tokenizer`, the
    placeholder tokenizer); returns `path`."""
    config = hf_config(preset, dtype) if isinstance(preset, str) else dict(preset, torch_dtype=dtype)
    os.makedirs(path, exist_ok=True)
    std = config.get("initializer_range", 0.02)

    def producer(index, name, shape):
        if name.endswith("norm.weight"):  # near one, as trained norms are
            return lambda: _random_tensor(shape, dtype, (seed, index), 1.0, 0.1)
        return lambda: _random_tensor(shape, dtype, (seed, index), 0.0, std)

    tensors = [(name, dtype, shape, producer(i, name, shape))
               for i, (name, shape) in enumerate(_parameter_shapes(config))]
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer:
        write_placeholder_tokenizer(path, config["vocab_size"], config.get("bos_token_id", 1),
                                    config.get("eos_token_id", 2))
    return str(path)
