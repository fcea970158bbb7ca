"""Quantization: the algorithms (QuantAlgo), their configuration (QuantConfig) and the builder pass."""

from .mode import KV_CACHE_QUANT_ALGO_LIST, QuantAlgo
from .quant_config import QuantConfig
from .quantize import QuantizationReport, check_supported, quantize

__all__ = ["KV_CACHE_QUANT_ALGO_LIST", "QuantAlgo", "QuantConfig", "QuantizationReport", "check_supported", "quantize"]
