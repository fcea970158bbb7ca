"""The builder's quantization pass: rewrites the linears a QuantConfig selects into quantized ones.

Implemented: FP8_PER_CHANNEL_PER_TOKEN (each `linear` becomes an `fp8_linear`: E4M3 weights with one
float32 scale per output channel; the op quantizes its input per token at run time, so no calibration is
needed), and kv_cache_quant_algo FP8 (an E4M3 KV cache, chosen by the runtime from config.json; nothing in
the graph changes). check_supported refuses every other config up front so that nothing is ever built (or loaded)
silently unquantized.
"""
import dataclasses
import fnmatch

import numpy as np

from .mode import QuantAlgo
from .quant_config import QuantConfig

FP8_E4M3_MAX = 448.0  # the largest finite E4M3 magnitude
SUPPORTED_QUANT_ALGOS = (QuantAlgo.NO_QUANT, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)
# FP8: the runtime keeps the KV pool as E4M3 values with scale 1 (the graph does not change; the engine's
# config.json records the algorithm and the runtime picks the pool dtype from it).
SUPPORTED_KV_CACHE_QUANT_ALGOS = (QuantAlgo.NO_QUANT, QuantAlgo.FP8)


def check_supported(quant_config: QuantConfig) -> None:
    """Raises ValueError naming the algorithm unless rtllm can build and run `quant_config`."""
    algo = quant_config.quant_algo
    if algo is not None and algo not in SUPPORTED_QUANT_ALGOS:
        why = " (its static activation scales need calibration)" if algo == QuantAlgo.FP8 else ""
        raise ValueError(f"quant_algo {algo.value} is not implemented yet{why}: rtllm builds "
                         f"{QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN.value} and unquantized engines only "
                         f"(quant_algo None, NO_QUANT or FP8_PER_CHANNEL_PER_TOKEN)")
    kv_algo = quant_config.kv_cache_quant_algo
    if kv_algo is not None and kv_algo not in SUPPORTED_KV_CACHE_QUANT_ALGOS:
        raise ValueError(f"kv_cache_quant_algo {kv_algo.value} is not implemented yet: rtllm stores the KV cache "
                         f"unquantized or as FP8 E4M3 (kv_cache_quant_algo None, NO_QUANT or FP8)")


@dataclasses.dataclass
class QuantizationReport:
    """What the quantize pass did: each linear's weight, quantized or kept (with the reason)."""

    quant_algo: str
    quantized: list = dataclasses.field(default_factory=list)  # weight names
    kept: dict = dataclasses.field(default_factory=dict)       # weight name -> why it stayed unquantized

    def summary(self) -> str:
        if self.quant_algo == QuantAlgo.NO_QUANT.value:
            return "no quantization"
        total = len(self.quantized) + len(self.kept)
        kept = "; ".join(f"{name} ({why})" for name, why in self.kept.items())
        return f"quantized {len(self.quantized)} of {total} linears to {self.quant_algo}" + \
            (f"; kept: {kept}" if kept else "")


def is_excluded(weight_name: str, exclude_modules) -> bool:
    """Whether a glob of exclude_modules matches the weight's module (`lm_head` for `lm_head.weight`) or
    the weight name itself."""
    module = weight_name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(weight_name, glob)
               for glob in exclude_modules)


def quantize(network, quant_config: QuantConfig) -> QuantizationReport:
    """The pass slot: replaces each linear not matched by exclude_modules with its quantized form and
    reports what it did. Reads no weight data: the new weights are lazy, quantized one tensor at a time
    when the engine is saved."""
    check_supported(quant_config)
    algo = quant_config.quant_algo or QuantAlgo.NO_QUANT
    report = QuantizationReport(algo.value)
    if algo != QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN:
        return report
    readers = network.consumers()
    for i, node in enumerate(network.nodes):
        if node.op != "linear":
            continue
        name = node.inputs[1]
        # A weight another op reads too (an embedding table tied to the LM head) stays as it is: the
        # embedding needs it unquantized, and the file stores it once.
        if is_excluded(name, quant_config.exclude_modules):
            report.kept[name] = "excluded by exclude_modules"
            continue
        if len(readers[name]) > 1:
            report.kept[name] = "tied to the embedding"
            continue
        report.quantized.append(name)
        weight = network.weights[name]
        fp8, scale = fp8_per_channel_parameters(weight)
        network.weights[name] = fp8
        network.weights[scale.name] = scale
        node.op = "fp8_linear"
        node.inputs = [node.inputs[0], name, scale.name, *node.inputs[2:]]
    return report


def fp8_per_channel_parameters(weight):
    """A [N, K] weight -> (its E4M3 codes [N, K] named as the weight, weight_scale [N] float32), both lazy
    and exempt from the engine-dtype cast (keep_dtype)."""
    from ..builder.tensor import Parameter

    if len(weight.shape) != 2:
        raise ValueError(f"weight {weight.name!r} {list(weight.shape)}: FP8 per-channel quantization needs a "
                         f"2-d [out_features, in_features] weight")
    module = weight.name.rsplit(".", 1)[0]
    fp8 = Parameter(weight.shape, "float8_e4m3", lambda: quantize_rows(_float32(weight))[0], weight.name)
    scale = Parameter(weight.shape[:1], "float32", lambda: row_scales(_float32(weight)), f"{module}.weight_scale")
    fp8.keep_dtype = scale.keep_dtype = True
    return fp8, scale


def _float32(weight) -> np.ndarray:
    from ..builder.safetensors_io import to_float32

    return to_float32(weight.load(), weight.dtype)


def row_scales(w: np.ndarray) -> np.ndarray:
    """float32 [N]: amax of each row / 448, so the row's largest magnitude maps to E4M3's largest; a row
    of zeros gets 1 (any scale reproduces it)."""
    amax = np.max(np.abs(w), axis=1).astype(np.float32)
    return np.where(amax > 0, amax / np.float32(FP8_E4M3_MAX), np.float32(1.0)).astype(np.float32)


def quantize_rows(w: np.ndarray) -> tuple:
    """float32 [N, K] -> (E4M3 codes uint8 [N, K], scales float32 [N]): codes = e4m3(w / scale) with the
    division in float32 and rtllm's own conversion (round to nearest even, saturate)."""
    from rtllm import _core

    scale = row_scales(w)
    scaled = np.ascontiguousarray(w / scale[:, None], dtype=np.float32)
    codes = _core.convert_floats(scaled.view(np.uint8).ravel(), "F32", "F8_E4M3")
    return np.asarray(codes, dtype=np.uint8).reshape(w.shape), scale
