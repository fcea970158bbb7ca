"""Quantization: the algorithms (QuantAlgo), their configuration (QuantConfig) and the builder pass."""

from .mode import KV_CACHE_QUANT_ALGO_LIST, QuantAlgo
from .quant_config import QuantConfig
from .calibration import Calibration, calibrate, load_calib_texts
from .quantize import QuantizationReport, check_supported, quantize, quantize_network

__all__ = ["KV_CACHE_QUANT_ALGO_LIST", "Calibration", "QuantAlgo", "QuantConfig", "QuantizationReport", "calibrate",
           "check_supported", "load_calib_texts", "quantize", "quantize_network"]
