"""Calibration: the activation ranges static FP8 scales are chosen from, measured by running the
unquantized model on rtllm's own runtime (a ModelRunner on the GPU when there is one, else on the CPU),
prompt by prompt.

The model is built unquantized into an engine in memory (same dtype and fusion as the real build) and
each sample is prefilled once. The runner records the largest |x| at each quantizable linear's input
(ModelRunner.observe_amax on the tensor the linear reads, keyed here by the linear's weight name; for
SmoothQuant, per input channel with ModelRunner.observe_channel_amax, on the CPU) and,
after each prompt, the largest |k| and |v| the KV cache holds for it in every layer (kv_cache_amax: k
after qk_norm and RoPE, as stored).

AWQ and GPTQ need more than ranges: per linear input, Σ |x| per channel and XᵀX over every calibration
token (float64; the float32 product of each prompt's rows is added in float64). The runner keeps a copy
of each linear's input after every prompt (ModelRunner.capture_outputs, on the CPU runtime only, so these
algorithms always calibrate on the CPU) and the sums are taken here with numpy. All statistics come from
one pass of the unquantized model: the inputs of later layers are not those of the partly quantized model
(GPTQ's and AWQ's reference implementations run layer by layer on quantized predecessors).
"""
from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources

import numpy as np

CORPUS_FILE = "calib_corpus.txt"  # shipped with the package: original English prose, varied topics
DEFAULT_DATASET = "cnn_dailymail"  # QuantConfig.calib_dataset's default: the shipped corpus stands for it
TOKENS_PER_BLOCK = 32


@dataclasses.dataclass
class InputStats:
    """Statistics of one linear input over the calibration tokens: rows seen, Σ |x| per channel [K] and
    XᵀX [K, K], both float64."""
    rows: int
    abs_sum: np.ndarray
    xtx: np.ndarray

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)

    def add(self, x: np.ndarray) -> None:
        self.rows += x.shape[0]
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.xtx += (x.T @ x).astype(np.float64)


@dataclasses.dataclass
class Calibration:
    """What the calibration run saw: per linear weight name, amax |input|; per layer, (amax |k|, amax |v|);
    for SmoothQuant, per linear weight name, amax |input| of each input channel (float32 [K]);
    for AWQ / GPTQ, per linear weight name, its input's InputStats (linears reading one tensor share it);
    for the ranks of a sharded build, per FP8 linear weight name, amax |W| of the whole weight."""
    num_samples: int
    num_tokens: int
    linear_amax: dict
    kv_amax: list
    channel_amax: dict = dataclasses.field(default_factory=dict)
    input_stats: dict = dataclasses.field(default_factory=dict)
    weight_amax: dict = dataclasses.field(default_factory=dict)

    def for_rank(self, network, mapping) -> "Calibration":
        """This calibration of the whole model as one rank of a sharded build sees it. A row-parallel linear
        of the rank's `network` reads tp_rank's contiguous slice of its input's K channels (its weight has
        K / tp_size columns): its per-channel statistics are cut to that slice. Column-parallel linears read
        the whole input, and ranges (amax of a tensor, K/V) hold for every slice."""
        if mapping.tp_size == 1:
            return self
        from ..nn.linear import tp_shard

        def row_parallel(name: str, k_whole: int) -> bool:
            return network.shape_of(name)[1] != k_whole

        channel_amax = {}
        input_stats, sliced = {}, {}  # linears that shared one input's statistics share the slice too
        for name in network.weights:
            amax = self.channel_amax.get(name)
            if amax is not None:
                channel_amax[name] = tp_shard(amax, 0, mapping) if row_parallel(name, amax.shape[0]) else amax
            st = self.input_stats.get(name)
            if st is not None:
                if not row_parallel(name, st.abs_sum.shape[0]):
                    input_stats[name] = st
                    continue
                if id(st) not in sliced:
                    sliced[id(st)] = InputStats(st.rows, tp_shard(st.abs_sum, 0, mapping).copy(),
                                                tp_shard(tp_shard(st.xtx, 0, mapping), 1, mapping).copy())
                input_stats[name] = sliced[id(st)]
        return dataclasses.replace(self, channel_amax=channel_amax, input_stats=input_stats)


def default_corpus_path() -> str:
    return str(resources.files("rtllm.quantization").joinpath(CORPUS_FILE))


def _paragraphs(text: str) -> list:
    """Paragraphs separated by blank lines, each joined into one line."""
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.strip())
        elif current:
            blocks.append(" ".join(current))
            current = []
    if current:
        blocks.append(" ".join(current))
    return blocks


def load_calib_texts(calib_data) -> list:
    """calib_data -> a list of non-empty strings. Accepts a list/tuple of strings, a path (str or
    os.PathLike) to a .txt file (paragraphs separated by blank lines) or a .jsonl file (one {"text": ...}
    object a line), or None (the corpus shipped with rtllm). Raises ValueError naming what is wrong."""
    if calib_data is None:
        calib_data = default_corpus_path()
    if isinstance(calib_data, (list, tuple)):
        if not calib_data:
            raise ValueError("calib_data=[] is empty: give at least one calibration text")
        for i, text in enumerate(calib_data):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"calib_data[{i}]={text!r} is not a non-empty string")
        return list(calib_data)
    if not isinstance(calib_data, (str, os.PathLike)):
        raise ValueError(f"calib_data={calib_data!r} must be a list of strings, a path to a .txt or .jsonl file, "
                         f"or None")
    path = os.fspath(calib_data)
    if not os.path.isfile(path):
        raise ValueError(f"calib_data={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith(".jsonl"):
        texts = []
        for n, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"calib_data={path!r} line {n} is not JSON: {e}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"calib_data={path!r} line {n} has no non-empty \"text\" string")
            texts.append(text)
    elif path.endswith(".txt"):
        texts = _paragraphs(content)
    else:
        raise ValueError(f"calib_data={path!r} must be a .txt or .jsonl file")
    if not texts:
        raise ValueError(f"calib_data={path!r} holds no text")
    return texts


def tokenizer_source(model):
    """Where the tokenizer a prompt to `model` would use comes from: its checkpoint directory (holding
    tokenizer.json), or the GGUF file whose metadata describes it; None without either (random-weight
    benchmark models)."""
    source = getattr(model, "source_dir", None)
    if source and os.path.isfile(os.path.join(source, "tokenizer.json")):
        return source
    return getattr(model, "gguf_path", None) or None


def model_tokenizer(model):
    """The tokenizer from tokenizer_source(model), or None."""
    from ..llmapi.tokenizer import TokenizerWrapper
    from ..models.gguf_tokenizer import load_gguf_tokenizer

    source = tokenizer_source(model)
    if source is None:
        return None
    return TokenizerWrapper.from_pretrained(source) if os.path.isdir(source) else load_gguf_tokenizer(source)


def tokenize_samples(model, texts: list, num_samples: int, max_tokens: int) -> list:
    """The first num_samples texts as token-id lists of at most max_tokens, with the model's tokenizer
    (model_tokenizer) and its special tokens, as a prompt would be."""
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        raise ValueError(f"calibration tokenizes its texts with the checkpoint's tokenizer.json (or a GGUF file's "
                         f"tokenizer), which {getattr(model, 'source_dir', None)!r} does not have")
    samples = []
    for text in texts[:num_samples]:
        ids = tokenizer.encode(text)[:max_tokens]
        if ids:
            samples.append(ids)
    if not samples:
        raise ValueError("calibration texts tokenize to no tokens")
    return samples


def random_samples(model, num_samples: int, max_tokens: int) -> list:
    """For a checkpoint without a tokenizer (random-weight benchmark models): seeded random token ids, with a
    warning, since ranges measured on them are not those of real text."""
    import warnings

    import numpy as np

    warnings.warn(f"{getattr(model, 'source_dir', 'the model')!r} has no tokenizer.json: calibrating on "
                  f"{num_samples} samples of random token ids instead of text", stacklevel=3)
    rng = np.random.default_rng(0)
    return [rng.integers(0, model.config.vocab_size, max_tokens).tolist() for _ in range(num_samples)]


def calibration_runtime_config(num_blocks: int, cpu_only: bool = False):
    """Calibration runs on the GPU when rtllm has one (an 8B model calibrates in seconds there), else on
    the CPU with a float32 KV cache. RTLLM_CALIB_DEVICE=cpu forces the CPU; so does `cpu_only`: the
    per-channel ranges of SmoothQuant and the inputs AWQ / GPTQ need are measured by the CPU runtime only."""
    from .. import _core

    if not cpu_only and os.environ.get("RTLLM_CALIB_DEVICE", "").lower() != "cpu" and _core.cuda_available():
        return _core.RuntimeConfig(device=_core.DeviceKind.CUDA, num_kv_blocks=num_blocks,
                                   tokens_per_block=TOKENS_PER_BLOCK, enable_cuda_graphs=False,
                                   device_sampling=False)
    return _core.RuntimeConfig(device=_core.DeviceKind.CPU, num_kv_blocks=num_blocks,
                               tokens_per_block=TOKENS_PER_BLOCK, kv_cache_dtype="F32")


def calibrate(model, build_config, quant_config, calib_data=None, linear_weights=()) -> Calibration:
    """Runs the unquantized `model` over the calibration samples on rtllm's runtime and returns the ranges
    quantize_network needs: the input amax of each linear of linear_weights (weight names), and per layer
    the K/V amax as the KV cache stores them."""
    from .. import _core
    from ..builder.build import BuildConfig, build
    from .mode import QuantAlgo
    from .quant_config import QuantConfig
    from .quantize import is_excluded, needs_input_stats

    if calib_data is None and quant_config.calib_dataset != DEFAULT_DATASET:
        calib_data = quant_config.calib_dataset  # a file named on the command line (--calib-data)
    max_len = min(quant_config.calib_max_seq_length, model.config.max_position_embeddings)
    if calib_data is None and tokenizer_source(model) is None:
        samples = random_samples(model, quant_config.calib_size, max_len)
    else:
        samples = tokenize_samples(model, load_calib_texts(calib_data), quant_config.calib_size, max_len)
    # A calibration engine sized for one sample per step; unquantized, with the real build's dtype and
    # fusion, so the linears read the same values they will in the quantized engine.
    calib_build = BuildConfig(max_batch_size=1, max_input_len=max_len, max_seq_len=max_len, max_num_tokens=max_len,
                              dtype=build_config.dtype, fuse=build_config.fuse)
    engine = build(model, calib_build, QuantConfig())
    graph_nodes = engine.graph["nodes"]
    wanted = set(linear_weights)
    inputs_of = {}  # weight name -> input tensor name in the calibration engine
    channel_inputs_of = {}  # SmoothQuant: every linear the pass may quantize -> its input tensor
    smooth = quant_config.quant_algo == QuantAlgo.W8A8_SQ_PER_CHANNEL
    for node in graph_nodes:
        if node["op"] == "linear" and node["inputs"][1] in wanted:
            inputs_of[node["inputs"][1]] = node["inputs"][0]
        if smooth and node["op"] == "linear" and not is_excluded(node["inputs"][1], quant_config.exclude_modules):
            channel_inputs_of[node["inputs"][1]] = node["inputs"][0]
    missing = sorted(wanted - set(inputs_of))
    if missing:
        raise ValueError(f"the calibration engine has no linear reading {missing[0]!r}")
    # AWQ / GPTQ: the input of every linear (the pass picks the ones it quantizes)
    capture = needs_input_stats(quant_config)
    stats_inputs = {n["inputs"][1]: n["inputs"][0] for n in graph_nodes if n["op"] == "linear"} if capture else {}
    stats = {t: InputStats(0, None, None) for t in set(stats_inputs.values())}
    num_layers = model.config.num_layers
    num_blocks = (max_len + TOKENS_PER_BLOCK - 1) // TOKENS_PER_BLOCK
    core_engine = engine.to_core()  # in memory: no engine file is written
    runner = _core.ModelRunner(core_engine, calibration_runtime_config(num_blocks, bool(channel_inputs_of) or capture))
    runner.observe_amax(sorted(set(inputs_of.values())))
    if channel_inputs_of:
        runner.observe_channel_amax(sorted(set(channel_inputs_of.values())))
    runner.capture_outputs(sorted(stats))
    kv_amax = np.zeros((num_layers, 2))  # np.maximum keeps a NaN: quantize_network refuses it
    block_table = list(range(num_blocks))
    for ids in samples:  # each prompt overwrites the blocks of the one before
        runner.forward(np.asarray(ids, dtype=np.int32), [len(ids)], [0],
                       np.asarray([block_table], dtype=np.int32))
        kv_amax = np.maximum(kv_amax, np.array(runner.kv_cache_amax(block_table, len(ids))))
        for name, st in stats.items():
            x = runner.captured(name)
            if st.abs_sum is None:
                st.abs_sum, st.xtx = np.zeros(x.shape[1]), np.zeros((x.shape[1], x.shape[1]))
            st.add(x)
    tensor_amax = runner.observed_amax()
    channel_amax = runner.observed_channel_amax() if channel_inputs_of else {}
    return Calibration(num_samples=len(samples), num_tokens=sum(map(len, samples)),
                       linear_amax={w: float(tensor_amax[t]) for w, t in inputs_of.items()},
                       kv_amax=[(float(k), float(v)) for k, v in kv_amax],
                       channel_amax={w: np.asarray(channel_amax[t], dtype=np.float32)
                                     for w, t in channel_inputs_of.items()},
                       input_stats={w: stats[t] for w, t in stats_inputs.items()})

