"""Quantization: the public entry point quantize(model, quant_config, calib_data) and the builder's pass
(quantize_network) that rewrites the linears a QuantConfig selects into quantized ones.

Implemented: FP8_PER_CHANNEL_PER_TOKEN (each `linear` becomes an `fp8_linear`: E4M3 weights with one
float32 scale per output channel; the op quantizes its input per token at run time, so no calibration is
needed); FP8 (a static `fp8_linear`: one float32 scale over the whole, possibly fused, weight and one
input scale from the largest activation calibration saw at that linear's input); and kv_cache_quant_algo
FP8 or INT8 (an E4M3 or int8 KV cache, chosen by the runtime from config.json, with each attention node's
k_scale and v_scale calibrated); W8A16 and W4A16 (weight-only round to nearest: each linear becomes a
`weight_only_linear` with int8 codes and one float32 scale per output channel, or packed int4 codes with one
float16 scale per group of group_size input channels, and with has_zero_point a float32 offset per group;
the activations stay in the engine's float dtype); W8A8_SQ_PER_CHANNEL (SmoothQuant, calibrated:
rtllm.quantization.smoothquant; each linear becomes an `int8_linear`). check_supported refuses every other config up front so that nothing is ever built
(or loaded) silently unquantized.
"""
import dataclasses
import fnmatch

import numpy as np

from .mode import QuantAlgo
from .quant_config import QuantConfig

FP8_E4M3_MAX = 448.0  # the largest finite E4M3 magnitude
SUPPORTED_QUANT_ALGOS = (QuantAlgo.NO_QUANT, QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, QuantAlgo.W8A16,
                         QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ,
                         QuantAlgo.W8A8_SQ_PER_CHANNEL)
# AWQ and GPTQ calibrate (per-linear input statistics), then write the same weight_only_linear.
CALIBRATED_WEIGHT_ONLY_ALGOS = (QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ)
WEIGHT_ONLY_QUANT_ALGOS = (QuantAlgo.W8A16, QuantAlgo.W4A16) + CALIBRATED_WEIGHT_ONLY_ALGOS
INT8_MAX, INT4_MAX, UINT4_MAX = 127, 7, 15
FP16_MAX = 65504.0
# FP8 / INT8: the runtime keeps the KV pool as E4M3 / int8 codes (the engine's config.json records the
# algorithm and the runtime picks the pool dtype from it); the attention nodes carry the calibrated
# k_scale / v_scale, amax over the largest code (448 or 127).
SUPPORTED_KV_CACHE_QUANT_ALGOS = (QuantAlgo.NO_QUANT, QuantAlgo.FP8, QuantAlgo.INT8)
KV_CODE_MAX = {QuantAlgo.FP8: FP8_E4M3_MAX, QuantAlgo.INT8: float(INT8_MAX)}


def check_supported(quant_config: QuantConfig) -> None:
    """Raises ValueError naming the algorithm unless rtllm can build and run `quant_config`."""
    algo = quant_config.quant_algo
    if algo is not None and algo not in SUPPORTED_QUANT_ALGOS:
        raise ValueError(f"quant_algo {algo.value} is not implemented yet: rtllm builds FP8, "
                         f"{QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN.value}, W8A16, W4A16, W4A16_AWQ, W4A16_GPTQ, "
                         f"W8A16_GPTQ, W8A8_SQ_PER_CHANNEL and unquantized engines only (quant_algo None, NO_QUANT "
                         f"or one of those)")
    kv_algo = quant_config.kv_cache_quant_algo
    if kv_algo is not None and kv_algo not in SUPPORTED_KV_CACHE_QUANT_ALGOS:
        raise ValueError(f"kv_cache_quant_algo {kv_algo.value} is not implemented yet: rtllm stores the KV cache "
                         f"unquantized, as FP8 E4M3 or as INT8 (kv_cache_quant_algo None, NO_QUANT, FP8 or INT8)")


def needs_calibration(quant_config: QuantConfig) -> bool:
    """FP8's static input scales, SmoothQuant's per-channel ranges, AWQ's and GPTQ's input statistics and an
    FP8 or INT8 KV cache's k/v scales come from activations."""
    return quant_config.quant_algo in (QuantAlgo.FP8, QuantAlgo.W8A8_SQ_PER_CHANNEL) or \
        quant_config.kv_cache_quant_algo in KV_CODE_MAX or needs_input_stats(quant_config)


def needs_input_stats(quant_config: QuantConfig) -> bool:
    """AWQ's scale search and GPTQ's Hessians read per-linear input statistics (calibration.InputStats)."""
    return quant_config.quant_algo in CALIBRATED_WEIGHT_ONLY_ALGOS


@dataclasses.dataclass
class QuantizationReport:
    """What the quantize pass did: each linear's weight, quantized or kept (with the reason), and, when
    it calibrated, on how much data and which scales it chose."""

    quant_algo: str
    quantized: list = dataclasses.field(default_factory=list)  # weight names
    kept: dict = dataclasses.field(default_factory=dict)       # weight name -> why it stayed unquantized
    calib_samples: int = 0   # calibration prompts run (0: no calibration)
    calib_tokens: int = 0    # their tokens in all
    input_scales: dict = dataclasses.field(default_factory=dict)  # weight name -> FP8 static input_scale
    kv_scales: list = dataclasses.field(default_factory=list)     # per layer (k_scale, v_scale)
    kv_cache_quant_algo: str = ""  # of kv_scales
    # W8A8_SQ_PER_CHANNEL: per group of linears reading one tensor, {"linears", "s", "fold", "target", "rows"}
    # (rtllm.quantization.smoothquant)
    smoothing: list = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        parts = []
        if self.quant_algo != QuantAlgo.NO_QUANT.value:
            total = len(self.quantized) + len(self.kept)
            kept = "; ".join(f"{name} ({why})" for name, why in self.kept.items())
            parts.append(f"quantized {len(self.quantized)} of {total} linears to {self.quant_algo}" +
                         (f"; kept: {kept}" if kept else ""))
        if self.calib_samples:
            parts.append(f"calibrated on {self.calib_samples} samples ({self.calib_tokens} tokens)")
        if self.kv_scales:
            k = [k for k, _ in self.kv_scales]
            v = [v for _, v in self.kv_scales]
            parts.append(f"{self.kv_cache_quant_algo} KV cache scales: k {min(k):.4g}..{max(k):.4g}, "
                         f"v {min(v):.4g}..{max(v):.4g}")
        return "; ".join(parts) or "no quantization"


def is_excluded(weight_name: str, exclude_modules) -> bool:
    """Whether a glob of exclude_modules matches the weight's module (`lm_head` for `lm_head.weight`) or
    the weight name itself."""
    module = weight_name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(module, glob) or fnmatch.fnmatchcase(weight_name, glob)
               for glob in exclude_modules)


def quantize(model, quant_config: QuantConfig, calib_data=None, build_config=None):
    """Builds `model` (an rtllm model, e.g. AutoModelForCausalLM.from_hugging_face(dir)) into an engine
    quantized as quant_config says; the same path as build(model, build_config, quant_config, calib_data).

    FP8 weights and an FP8 KV cache are calibrated first: the unquantized model runs the prompts of
    calib_data (a list of strings, a .txt file of paragraphs separated by blank lines, a .jsonl file of
    {"text": ...} lines, or None for the corpus shipped with rtllm; quant_config.calib_size samples of at
    most calib_max_seq_length tokens) on rtllm's CPU runtime (rtllm.quantization.calibration). The returned
    Engine's quantization_report says what was quantized and which scales calibration chose."""
    from ..builder.build import build

    return build(model, build_config, quant_config, calib_data=calib_data)


def selected_linears(network, quant_config: QuantConfig, report: QuantizationReport | None = None) -> list:
    """The `linear` nodes quant_config quantizes (not matched by exclude_modules, not tied to another
    reader); the others are recorded in report.kept with the reason."""
    readers = network.consumers()
    selected = []
    for node in network.nodes:
        if node.op != "linear":
            continue
        name = node.inputs[1]
        if is_excluded(name, quant_config.exclude_modules):
            if report is not None:
                report.kept[name] = "excluded by exclude_modules"
            continue
        # A weight another op reads too (an embedding table tied to the LM head) stays as it is: the
        # embedding needs it unquantized, and the file stores it once.
        if len(readers[name]) > 1:
            if report is not None:
                report.kept[name] = "tied to the embedding"
            continue
        selected.append(node)
    return selected


def quantize_network(network, quant_config: QuantConfig, calibration=None) -> QuantizationReport:
    """The builder's pass: replaces each selected linear with its quantized form, sets the attention
    nodes' k_scale / v_scale for an FP8 KV cache, and reports what it did. `calibration`
    (rtllm.quantization.calibration.Calibration) is required when needs_calibration(quant_config). Reads no
    weight data: the new weights are lazy, quantized one tensor at a time when the engine is saved."""
    check_supported(quant_config)
    algo = quant_config.quant_algo or QuantAlgo.NO_QUANT
    report = QuantizationReport(algo.value)
    if needs_calibration(quant_config):
        if calibration is None:
            raise ValueError(f"quant_algo {algo.value} with kv_cache_quant_algo {quant_config.kv_cache_quant_algo} "
                             f"needs calibration data (rtllm.quantization.quantize(model, quant_config, calib_data))")
        report.calib_samples, report.calib_tokens = calibration.num_samples, calibration.num_tokens
    kv_algo = quant_config.kv_cache_quant_algo
    if kv_algo in KV_CODE_MAX:
        report.kv_cache_quant_algo = kv_algo.value
        report.kv_scales = [(amax_scale(k, KV_CODE_MAX[kv_algo]), amax_scale(v, KV_CODE_MAX[kv_algo]))
                            for k, v in calibration.kv_amax]
        for node in network.nodes:
            if node.op == "attention":
                k_scale, v_scale = report.kv_scales[node.attrs["layer_idx"]]
                node.attrs["k_scale"], node.attrs["v_scale"] = k_scale, v_scale
    if algo in WEIGHT_ONLY_QUANT_ALGOS:
        return _weight_only(network, quant_config, report, calibration)
    if algo == QuantAlgo.W8A8_SQ_PER_CHANNEL:
        from .smoothquant import smooth_quant

        smooth_quant(network, quant_config, calibration, report, selected_linears(network, quant_config, report))
        return report
    if algo not in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        return report
    for node in selected_linears(network, quant_config, report):
        name = node.inputs[1]
        report.quantized.append(name)
        weight = network.weights[name]
        if algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN:
            fp8, scale = fp8_per_channel_parameters(weight)
            scales = [scale]
        else:
            if name not in calibration.linear_amax:
                raise ValueError(f"calibration has no activation range for linear {name!r}")
            input_scale = amax_scale(calibration.linear_amax[name])
            report.input_scales[name] = input_scale
            # a rank of a sharded build scales its shard as the whole weight is scaled
            fp8, scale, in_scale = fp8_per_tensor_parameters(weight, input_scale, calibration.weight_amax.get(name))
            scales = [scale, in_scale]
            node.attrs["activation_scaling"] = "static"
        network.weights[name] = fp8
        for s in scales:
            network.weights[s.name] = s
        node.op = "fp8_linear"
        node.inputs = [node.inputs[0], name, *(s.name for s in scales), *node.inputs[2:]]
    return report


def amax_scale(amax: float, code_max: float = FP8_E4M3_MAX) -> float:
    """The float32 scale mapping amax to the largest code magnitude (E4M3's 448 by default, 127 for int8):
    amax / code_max; 1 for an amax of 0 (any scale reproduces zeros). A non-finite amax (a broken
    calibration run) is refused."""
    amax = float(amax)
    if not np.isfinite(amax) or amax < 0:
        raise ValueError(f"calibration saw an activation range of {amax}; the model's activations are not finite")
    return float(np.float32(amax) / np.float32(code_max)) if amax > 0 else 1.0


def fp8_per_tensor_parameters(weight, input_scale: float, weight_amax: float | None = None):
    """A [N, K] weight -> (E4M3 codes [N, K] named as the weight, weight_scale [1], input_scale [1]), the
    first two lazy; all exempt from the engine-dtype cast. weight_amax: the range the scale covers (None:
    the weight's own amax; a shard gets its whole weight's)."""
    from ..builder.tensor import Parameter

    if len(weight.shape) != 2:
        raise ValueError(f"weight {weight.name!r} {list(weight.shape)}: FP8 quantization needs a 2-d "
                         f"[out_features, in_features] weight")
    module = weight.name.rsplit(".", 1)[0]
    quantized = lambda: shared_result((weight, "fp8 tensor"),  # noqa: E731
                                      lambda: quantize_tensor(_float32(weight), weight_amax))
    fp8 = Parameter(weight.shape, "float8_e4m3", lambda: quantized()[0], weight.name)
    scale = Parameter((1,), "float32", lambda: quantized()[1], f"{module}.weight_scale")
    in_scale = Parameter((1,), "float32", lambda: np.array([input_scale], dtype=np.float32),
                         f"{module}.input_scale")
    fp8.keep_dtype = scale.keep_dtype = in_scale.keep_dtype = True
    return fp8, scale, in_scale


def quantize_tensor(w: np.ndarray, amax: float | None = None) -> tuple:
    """float32 [N, K] -> (E4M3 codes uint8 [N, K], weight_scale float32 [1]): one scale, amax |w| / 448 over
    the whole tensor (1 for zeros), codes = e4m3(w / scale) in float32. `amax` (>= that of w) replaces w's:
    a shard quantized as its whole tensor is."""
    if amax is not None and not amax >= (own := float(np.max(np.abs(w), initial=0.0))):
        raise ValueError(f"weight range {amax} is below the shard's own {own}")
    scale = row_scales(w.reshape(1, -1) if amax is None else np.array([[amax]], dtype=np.float32))
    return _e4m3_codes(np.ascontiguousarray(w / scale[0], dtype=np.float32)), scale


def fp8_per_channel_parameters(weight):
    """A [N, K] weight -> (its E4M3 codes [N, K] named as the weight, weight_scale [N] float32), both lazy
    and exempt from the engine-dtype cast (keep_dtype)."""
    from ..builder.tensor import Parameter

    if len(weight.shape) != 2:
        raise ValueError(f"weight {weight.name!r} {list(weight.shape)}: FP8 per-channel quantization needs a "
                         f"2-d [out_features, in_features] weight")
    module = weight.name.rsplit(".", 1)[0]
    quantized = lambda: shared_result((weight, "fp8 rows"),  # noqa: E731
                                      lambda: quantize_rows(_float32(weight)))
    fp8 = Parameter(weight.shape, "float8_e4m3", lambda: quantized()[0], weight.name)
    scale = Parameter(weight.shape[:1], "float32", lambda: quantized()[1], f"{module}.weight_scale")
    fp8.keep_dtype = scale.keep_dtype = True
    return fp8, scale


_last_shared = [None, None]  # (key, result) of the latest shared_result computation


def shared_result(key: tuple, compute):
    """compute(), done once for calls in a row with the same key, whose first element is the weight object
    (compared by identity, and kept alive with the result). A quantized weight's codes, scales and offsets
    are separate lazy parameters that the engine writes one after another: their loaders share one
    quantization this way, and only the latest result is held."""
    if _last_shared[0] is None or len(_last_shared[0]) != len(key) or \
            any(a is not b and a != b for a, b in zip(_last_shared[0], key)):
        _last_shared[:] = [None, None]  # release the previous result before computing the next
        _last_shared[:] = [key, compute()]
    return _last_shared[1]


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
    scale = row_scales(w)
    return _e4m3_codes(np.ascontiguousarray(w / scale[:, None], dtype=np.float32)), scale


def _e4m3_codes(x: np.ndarray) -> np.ndarray:
    """float32 array -> its E4M3 codes (uint8, same shape) by rtllm's own conversion (RNE, saturating)."""
    from rtllm import _core

    codes = _core.convert_floats(np.ascontiguousarray(x, dtype=np.float32).view(np.uint8).ravel(), "F32", "F8_E4M3")
    return np.asarray(codes, dtype=np.uint8).reshape(x.shape)


# ---------------------------------------------------------------- weight-only (W8A16, W4A16)

def _weight_only(network, quant_config: QuantConfig, report: QuantizationReport,
                 calibration=None) -> QuantizationReport:
    """Each selected linear -> weight_only_linear (docs/engine_format.md): W8A16 per output channel,
    W4A16 per group of quant_config.group_size input channels (with has_zero_point: asymmetric); W4A16_AWQ
    as W4A16 after AWQ's scaling (awq.py); W4A16_GPTQ / W8A16_GPTQ from GPTQ (gptq.py; group_size -1: per
    output channel)."""
    algo = quant_config.quant_algo
    int4 = algo in (QuantAlgo.W4A16, QuantAlgo.W4A16_AWQ, QuantAlgo.W4A16_GPTQ)
    gptq = algo in (QuantAlgo.W4A16_GPTQ, QuantAlgo.W8A16_GPTQ)
    grouped = algo != QuantAlgo.W8A16
    selected = selected_linears(network, quant_config, report)
    for node in selected:  # refuse before rewriting anything
        weight = network.weights[node.inputs[1]]
        if len(weight.shape) != 2:
            raise ValueError(f"weight {weight.name!r} {list(weight.shape)}: weight-only quantization needs a 2-d "
                             f"[out_features, in_features] weight")
        K = weight.shape[1]
        if grouped and quant_config.group_size > 0 and K % quant_config.group_size:
            raise ValueError(f"{algo.value}: linear {weight.name.rsplit('.', 1)[0]!r} has K={K} input features, not "
                             f"a multiple of group_size={quant_config.group_size}; choose a group size dividing "
                             f"{K} or exclude the module (exclude_modules)")
    if algo in CALIBRATED_WEIGHT_ONLY_ALGOS:
        if calibration is None or not calibration.input_stats:
            raise ValueError(f"quant_algo {algo.value} needs calibration data (rtllm.quantization.quantize(model, "
                             f"quant_config, calib_data))")
        report.calib_samples, report.calib_tokens = calibration.num_samples, calibration.num_tokens
    if algo == QuantAlgo.W4A16_AWQ:
        from .awq import apply_awq

        apply_awq(network, selected, quant_config, calibration, report)
    for node in selected:
        name = node.inputs[1]
        report.quantized.append(name)
        weight = network.weights[name]
        group_size = quant_config.group_size if grouped and quant_config.group_size > 0 else weight.shape[1]
        if gptq:
            stats = calibration.input_stats.get(name)
            if stats is None:
                raise ValueError(f"calibration has no input statistics for linear {name!r}")
            params = gptq_parameters(weight, stats, 4 if int4 else 8, group_size, quant_config.has_zero_point,
                                     quant_config.desc_act)
        elif int4:
            params = weight_only_int4_parameters(weight, quant_config.group_size, quant_config.has_zero_point)
        else:
            params = weight_only_int8_parameters(weight)
        for p in params:
            network.weights[p.name] = p
        node.op = "weight_only_linear"
        node.attrs["group_size"] = group_size
        node.attrs["has_offset"] = len(params) == 3
        node.inputs = [node.inputs[0], *(p.name for p in params), *node.inputs[2:]]
    return report


def weight_only_parameters(weight, bits: int, group_size: int, has_offset: bool, compute,
                           scale_dtype: str | None = None) -> list:
    """[codes [N, K] (int8, or int4 packed) named as the weight, weight_scale [N, K / group_size] (scale_dtype;
    by default float16 for 4 bits, float32 for 8), and with has_offset weight_offset (float32)], lazy, from one
    call of compute() -> (codes int8 [N, K], scale, offset or None) shared between them; exempt from the
    engine-dtype cast."""
    from ..builder.safetensors_io import pack_int4
    from ..builder.tensor import Parameter

    N, K = weight.shape
    module = weight.name.rsplit(".", 1)[0]
    result = lambda: shared_result((weight, "weight only", bits, group_size, has_offset), compute)  # noqa: E731
    codes = Parameter((N, K), "int4", lambda: pack_int4(result()[0]), weight.name) if bits == 4 else \
        Parameter((N, K), "int8", lambda: result()[0], weight.name)
    scale_dtype = scale_dtype or ("float16" if bits == 4 else "float32")
    params = [codes, Parameter((N, K // group_size), scale_dtype, lambda: result()[1],
                               f"{module}.weight_scale")]
    if has_offset:
        params.append(Parameter((N, K // group_size), "float32", lambda: result()[2], f"{module}.weight_offset"))
    for p in params:
        p.keep_dtype = True
    return params


def gptq_parameters(weight, stats, bits: int, group_size: int, has_zero_point: bool, desc_act: bool) -> list:
    """weight_only_parameters of GPTQ (gptq.gptq_quantize) with the input statistics of the linear."""
    from .gptq import gptq_quantize

    return weight_only_parameters(weight, bits, group_size, has_zero_point,
                                  lambda: gptq_quantize(_float32(weight), stats.xtx, bits, group_size,
                                                        sym=not has_zero_point, desc_act=desc_act))


def weight_only_int8_parameters(weight) -> list:
    """A [N, K] weight -> [int8 codes [N, K] named as the weight, weight_scale [N, 1] float32], lazy and
    exempt from the engine-dtype cast."""
    from ..builder.tensor import Parameter

    N, K = weight.shape
    module = weight.name.rsplit(".", 1)[0]
    quantized = lambda: shared_result((weight, "int8 rows"),  # noqa: E731
                                      lambda: quantize_int8_rows(_float32(weight)))
    codes = Parameter((N, K), "int8", lambda: quantized()[0], weight.name)
    scale = Parameter((N, 1), "float32", lambda: quantized()[1], f"{module}.weight_scale")
    codes.keep_dtype = scale.keep_dtype = True
    return [codes, scale]


def weight_only_int4_parameters(weight, group_size: int, has_zero_point: bool) -> list:
    """A [N, K] weight -> [int4 codes [N, K] (packed) named as the weight, weight_scale [N, K / group_size]
    float16, and with has_zero_point weight_offset [N, K / group_size] float32], lazy and exempt from the
    engine-dtype cast."""
    from ..builder.safetensors_io import pack_int4
    from ..builder.tensor import Parameter

    N, K = weight.shape
    module = weight.name.rsplit(".", 1)[0]
    quantize_groups = lambda: shared_result(  # noqa: E731
        (weight, "int4 groups", group_size, has_zero_point),
        lambda: quantize_int4_groups(_float32(weight), group_size, has_zero_point))
    params = [Parameter((N, K), "int4", lambda: pack_int4(quantize_groups()[0]), weight.name),
              Parameter((N, K // group_size), "float16", lambda: quantize_groups()[1], f"{module}.weight_scale")]
    if has_zero_point:
        params.append(Parameter((N, K // group_size), "float32", lambda: quantize_groups()[2],
                                f"{module}.weight_offset"))
    for p in params:
        p.keep_dtype = True
    return params


def quantize_int8_rows(w: np.ndarray) -> tuple:
    """float32 [N, K] -> (int8 codes [N, K], scales float32 [N, 1]): scale = amax_k |w[n, k]| / 127 (1 for a
    row of zeros), codes = clamp(round_half_even(w / scale), -127, 127), the division in float32."""
    amax = np.max(np.abs(w), axis=1, keepdims=True).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(INT8_MAX), np.float32(1.0)).astype(np.float32)
    codes = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return codes, scale


def _fp16_scale(x: np.ndarray) -> np.ndarray:
    """float32 scales -> the float16 scales stored: rounded to nearest, at most float16's max, and at least
    its smallest subnormal (a scale of 0 would make the codes meaningless); 1 where x is 0 (a group of
    zeros: every code reproduces it)."""
    s = np.minimum(x, np.float32(FP16_MAX)).astype(np.float16)
    s = np.where(s > 0, s, np.float16(2.0 ** -24))
    return np.where(x > 0, s, np.float16(1.0)).astype(np.float16)


def quantize_int4_groups(w: np.ndarray, group_size: int, has_zero_point: bool) -> tuple:
    """float32 [N, K] -> (int4 codes int8 [N, K] in [-8, 7], scales float16 [N, G], offsets float32 [N, G]
    or None), G = K / group_size; round to nearest even, the codes computed with the stored (float16) scale
    in float32.

    Symmetric: scale = amax |w| / 7 per group, q = clamp(round(w / scale), -8, 7); w ≈ q · scale.
    has_zero_point: the group's range [min(w, 0), max(w, 0)] (so that 0 is exact) in 15 steps,
    scale = (max - min) / 15, integer zero point z = clamp(round(-min / scale), 0, 15),
    u = clamp(round(w / scale) + z, 0, 15), stored q = u - 8 and offset = (8 - z) · scale (exact in
    float32); w ≈ q · scale + offset = (u - z) · scale."""
    N, K = w.shape
    g = w.reshape(N, K // group_size, group_size)
    if not has_zero_point:
        scale = _fp16_scale(np.max(np.abs(g), axis=2) / np.float32(INT4_MAX))
        q = np.rint(g / scale.astype(np.float32)[..., None])
        return np.clip(q, -8, INT4_MAX).astype(np.int8).reshape(N, K), scale, None
    lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
    scale = _fp16_scale((hi - lo) / np.float32(UINT4_MAX))
    s32 = scale.astype(np.float32)
    zero = np.clip(np.rint(-lo / s32), 0, UINT4_MAX)
    u = np.clip(np.rint(g / s32[..., None]) + zero[..., None], 0, UINT4_MAX)
    offset = ((8 - zero) * s32).astype(np.float32)
    return (u - 8).astype(np.int8).reshape(N, K), scale, offset
