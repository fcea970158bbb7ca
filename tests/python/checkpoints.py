"""Tiny random-weight HF checkpoints for tests, made with transformers + torch (test-only references)."""

import torch
import transformers

_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "llama3": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "granite": transformers.GraniteConfig,
}
_MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "llama3": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
    "granite": transformers.GraniteForCausalLM,
}
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_config(arch: str = "llama", vocab_size: int = 256, num_layers: int = 2, tie_word_embeddings: bool = False,
                **overrides) -> transformers.PretrainedConfig:
    kwargs = dict(vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  intermediate_size=128, num_hidden_layers=num_layers, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                  rope_theta=10000.0)
    if arch == "llama3":
        # original_max_position_embeddings small enough that all three frequency bands occur at head_dim 16
        kwargs.update(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                         "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 64})
    if arch == "mistral":
        kwargs.update(sliding_window=None)
    if arch == "granite":
        # None is 1, and the attention scale is unlike head_dim ** -0.5 = 0.25. rtllm folds the others into
        # weights, which is exact in bf16/fp16 only for powers of two: test_generation_vs_hf checks Granite
        # 3's own values in float32.
        kwargs.update(embedding_multiplier=4.0, residual_multiplier=0.5, attention_multiplier=0.1, logits_scaling=2.0)
    kwargs.update(overrides)
    return _CONFIG_CLASSES[arch](**kwargs)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits differ clearly between tokens; norm weights around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)


def make_hf_checkpoint(path, arch: str = "llama", dtype: str = "float32", tie_word_embeddings: bool = False,
                       sharded: bool = False, vocab_size: int = 256, num_layers: int = 2, seed: int = 0,
                       **config_overrides):
    """Writes a tiny random HF model (hidden 64, 4 heads, 2 kv heads, head_dim 16, intermediate 128,
    512 positions) to `path` with save_pretrained (safetensors; several shards when `sharded`)."""
    config = tiny_config(arch, vocab_size, num_layers, tie_word_embeddings, **config_overrides)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[arch](config)
    randomize(model, seed)
    model = model.to(_TORCH_DTYPES[dtype])
    model.config.dtype = dtype
    model.save_pretrained(str(path), safe_serialization=True, max_shard_size="40KB" if sharded else "10GB")
    return path
