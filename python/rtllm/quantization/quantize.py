"""The builder's quantization pass: rewrites the linears a QuantConfig selects into quantized ones.

Only the unquantized engine is implemented; check_supported refuses every other config up front so that
nothing is ever built (or loaded) silently unquantized.
"""
from .quant_config import QuantConfig


def check_supported(quant_config: QuantConfig) -> None:
    """Raises ValueError naming the algorithm unless rtllm can build and run `quant_config`."""
    if quant_config.quantizes_weights:
        raise ValueError(f"quant_algo {quant_config.quant_algo.value} is not implemented yet: rtllm builds "
                         f"unquantized engines only (quant_algo None or NO_QUANT)")
    if quant_config.quantizes_kv_cache:
        raise ValueError(f"kv_cache_quant_algo {quant_config.kv_cache_quant_algo.value} is not implemented yet: "
                         f"rtllm keeps the KV cache unquantized (kv_cache_quant_algo None or NO_QUANT)")


def quantize(network, quant_config: QuantConfig) -> None:
    """The pass slot: replaces each linear not matched by exclude_modules with its quantized form. With no
    quantization there is nothing to rewrite."""
    check_supported(quant_config)
