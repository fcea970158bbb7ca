"""build(model, BuildConfig, QuantConfig) -> Engine: trace forward() into a Network, run the passes, attach
weights."""

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..mapping import Mapping
from ..quantization import QuantConfig, check_supported
from ..quantization.quantize import needs_calibration, quantize_network, selected_linears
from . import passes
from .engine import FORMAT_VERSION, Engine, rtllm_version
from .tensor import Network

# Weight dtype choices: BuildConfig.dtype, from_hugging_face(dtype=) and every --dtype option. "auto" keeps
# the checkpoint's dtype.
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class BuildConfig:
    """Limits the engine is built for; the runtime never exceeds them.

    max_seq_len None -> the model's max_position_embeddings (it only bounds a request's length; the KV
    cache is sized at run time). max_input_len None -> max_seq_len (a prompt may fill the context, as
    with vLLM's max_model_len; one longer than max_num_tokens needs chunked prefill). dtype "auto" keeps the
    model's weight dtype. fuse enables the fusion passes.
    """
    max_batch_size: int = 64
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    dtype: str = "auto"
    fuse: bool = True

    def __post_init__(self):
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
            value = getattr(self, name)
            if value is None and name in ("max_input_len", "max_seq_len"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"BuildConfig.{name}={value!r} must be a positive integer")
        if self.max_input_len is not None and self.max_seq_len is not None and self.max_input_len > self.max_seq_len:
            raise ValueError(f"BuildConfig.max_input_len={self.max_input_len} exceeds max_seq_len={self.max_seq_len}")
        # max_input_len may exceed max_num_tokens: such prompts run with chunked prefill (the executor
        # refuses them without it, naming the option).
        if self.dtype not in DTYPES:
            raise ValueError(f"BuildConfig.dtype={self.dtype!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(self.fuse, bool):
            raise ValueError(f"BuildConfig.fuse={self.fuse!r} must be a bool")

    def resolved(self, max_position_embeddings: int) -> "BuildConfig":
        """A copy with max_seq_len and max_input_len filled in for a model."""
        max_seq_len = self.max_seq_len or max_position_embeddings
        if max_seq_len > max_position_embeddings:
            raise ValueError(f"BuildConfig.max_seq_len={max_seq_len} exceeds the model's "
                             f"max_position_embeddings={max_position_embeddings}")
        max_input_len = self.max_input_len or max_seq_len
        if max_input_len > max_seq_len:
            raise ValueError(f"BuildConfig.max_input_len={max_input_len} exceeds max_seq_len={max_seq_len}")
        return dataclasses.replace(self, max_seq_len=max_seq_len, max_input_len=max_input_len)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens",
                                              "fuse")}


def trace(model) -> Network:
    """Runs model.forward on the graph inputs; returns the unfused network."""
    for name, param in model.named_parameters():
        param.name = name
    network = Network()
    with network:
        input_ids = network.add_input("input_ids", "int32", ["num_tokens"])
        positions = network.add_input("positions", "int32", ["num_tokens"])
        logits_indices = network.add_input("logits_indices", "int32", ["num_logits"])
        logits = model.forward(input_ids, positions, logits_indices)
        network.mark_output(logits, "logits")
    return network


def fusion_passes(build_config: BuildConfig) -> list:
    """The rewrites build() runs on the traced network before quantization (BuildConfig.fuse)."""
    return list(passes.ALL_PASSES) if build_config.fuse else []


def build(model, build_config: BuildConfig | None = None, quant_config: QuantConfig | None = None,
          calib_data=None, calibration=None) -> Engine:
    """Traces `model` (a module with .config and forward(input_ids, positions, logits_indices)) into an
    engine: the graph after the passes, and lazy weights in the engine dtype. Reads no weight data;
    Engine.save streams it (quantizing each weight as it is written). quant_config None builds unquantized.
    Algorithms that need activation statistics calibrate first on calib_data (rtllm.quantization.quantize
    describes it; None: the corpus shipped with rtllm), which runs the unquantized model. A rank of a
    sharded model takes `calibration` instead: that of the whole model (calibrate_whole_model), which
    build_and_save measures once for every rank."""
    build_config = (build_config or BuildConfig()).resolved(model.config.max_position_embeddings)
    prequantized = getattr(model, "prequantized", None)
    if prequantized is not None:  # a pre-quantized checkpoint: its own algorithms, nothing left to quantize
        quant_config = prequantized.quant_config(quant_config)
    else:
        quant_config = quant_config or QuantConfig()
        check_supported(quant_config)  # before any work
    mapping = getattr(model, "mapping", None) or Mapping()
    if mapping.tp_size > 1:
        check_tensor_parallel_build(quant_config, prequantized, mapping, calibration is not None)
    model_config = dataclasses.replace(model.config)
    if build_config.dtype != "auto":
        model_config.dtype = build_config.dtype
    window = model_config.sliding_window
    if window is not None and window < build_config.max_seq_len:
        raise ValueError(f"sliding window attention is not supported: the model's sliding_window={window} is "
                         f"less than max_seq_len={build_config.max_seq_len}; build with max_seq_len <= {window}")

    network = trace(model)
    for rewrite in fusion_passes(build_config):
        rewrite(network)
    if prequantized is not None:
        quantization_report = prequantized.apply(network)
    else:
        # Then quantization: calibration first when the algorithms need activation ranges.
        if needs_calibration(quant_config):
            if calibration is None:
                calibration = _calibrate(model, network, build_config, quant_config, calib_data)
            calibration = calibration.for_rank(network, mapping)
        else:
            calibration = None
        quantization_report = quantize_network(network, quant_config, calibration)
    if build_config.fuse:  # once the FP8 linears hold their input scales
        passes.fuse_fp8_input_quantization(network)
    network.prune()
    network.renumber()
    # in order of first use; every weight in the engine dtype except rope.inv_freq, which stays float32,
    # and the quantized weights and their scales (keep_dtype)
    names = dict.fromkeys(i for node in network.nodes for i in node.inputs if i in network.weights)
    weights = {}
    for name in names:
        weight = network.weights[name]
        keep = name == "rope.inv_freq" or weight.keep_dtype
        weights[name] = weight if keep else weight.cast(model_config.dtype)
    config = {
        "format_version": FORMAT_VERSION,
        "rtllm_version": rtllm_version(),
        "architecture": model_config.architecture,
        "model_config": model_config.to_json(),
        "build_config": build_config.to_json(),
        "quantization": quant_config.to_dict(),
        # every rank's graph is the same (rank-dependent data lives in its weights), so one config.json
        # serves all the rank{N}.engine files
        "mapping": {"world_size": mapping.world_size, "tp_size": mapping.tp_size},
        "graph": network.to_json(),
    }
    engine = Engine(config, weights, source_dir=getattr(model, "source_dir", None), rank=mapping.rank)
    engine.quantization_report = quantization_report
    return engine


def _calibrate(model, network, build_config: BuildConfig, quant_config: QuantConfig, calib_data,
               whole_weight_amax: bool = False):
    """Runs the calibration quant_config needs on the unquantized `model` (traced into `network`, the passes
    applied). whole_weight_amax: also the amax of each FP8 weight, for the ranks of a sharded build, whose
    per-tensor weight scales must be those of the whole weights."""
    from ..quantization import QuantAlgo
    from ..quantization.calibration import calibrate
    from ..quantization.quantize import _float32

    # FP8's static input scales: the linears the pass will quantize, as it selects them
    static = quant_config.quant_algo == QuantAlgo.FP8
    linears = [n.inputs[1] for n in selected_linears(network, quant_config)] if static else []
    calibration = calibrate(model, build_config, quant_config, calib_data, linears)
    if whole_weight_amax:  # one weight in memory at a time
        calibration.weight_amax = {name: float(np.max(np.abs(_float32(network.weights[name])))) for name in linears}
    return calibration


def calibrate_whole_model(model, build_config: BuildConfig | None, quant_config: QuantConfig, calib_data=None):
    """The calibration of the unsharded `model` that every rank of a sharded build quantizes with
    (build(..., calibration=)): activation statistics of the whole model, and its FP8 weights' ranges."""
    build_config = (build_config or BuildConfig()).resolved(model.config.max_position_embeddings)
    network = trace(model)
    for rewrite in fusion_passes(build_config):
        rewrite(network)
    return _calibrate(model, network, build_config, quant_config, calib_data, whole_weight_amax=True)


def check_tensor_parallel_build(quant_config: QuantConfig, prequantized, mapping: Mapping,
                                calibrated: bool = False) -> None:
    """What a sharded build cannot do (yet), refused before any work. prequantized: the model's
    pre-quantized state (None for a float checkpoint)."""
    from ..quantization.prequantized import PrequantizedModel, WeightOnlyPrequantized

    if prequantized is not None and not isinstance(prequantized, (PrequantizedModel, WeightOnlyPrequantized)):
        raise ValueError(f"GGUF files do not build with tensor parallelism yet (tp_size={mapping.tp_size}); build "
                         f"with tp_size=1")
    if prequantized is None and needs_calibration(quant_config) and not calibrated:
        raise ValueError(f"quant_algo={quant_config.quant_algo} calibrates on the whole model, which one rank "
                         f"(tp_size={mapping.tp_size}) does not hold: build the ranks with build_and_save (or "
                         f"`rtllm build --tp-size`), which calibrates the whole model once, or pass build() the "
                         f"calibration of calibrate_whole_model()")


def build_and_save(load_model, output: str, build_config: BuildConfig | None = None,
                   quant_config: QuantConfig | None = None, tp_size: int = 1, calib_data=None) -> Engine:
    """Builds and saves the engine of every tensor-parallel rank into `output`: load_model(mapping) returns the
    model holding that rank's shards (e.g. AutoModelForCausalLM.from_hugging_face(dir, mapping=mapping)).
    Ranks are built one after the other, so the host holds one rank's weights at a time; algorithms that
    calibrate run the whole model (load_model(Mapping())) once first, and every rank quantizes with what it
    saw. Returns rank 0's engine (its config and quantization report)."""
    calibration = None
    if tp_size > 1 and quant_config is not None and needs_calibration(quant_config):
        whole = load_model(Mapping())
        if getattr(whole, "prequantized", None) is None:  # a pre-quantized checkpoint has its scales
            calibration = calibrate_whole_model(whole, build_config, quant_config, calib_data)
        del whole
    first = None
    for rank in range(tp_size):
        engine = build(load_model(Mapping(tp_size, tp_size, rank)), build_config, quant_config, calib_data,
                       calibration)
        if first is not None and engine.config != first.config:  # one config.json serves every rank
            raise RuntimeError(f"rank {rank} built a different graph from rank 0's")
        engine.save(output)
        first = first or engine
    return first
