"""Engine: config (model, build, graph) + lazy weights; saved as the directory of docs/engine_format.md."""

import importlib.metadata
import json
import os
import shutil

import numpy as np

from ..quantization import QuantConfig, check_supported
from .safetensors_io import SafetensorsFile, stored_shape, storage_type, write_safetensors
from .tensor import Parameter

FORMAT_VERSION = 2  # 2: the graph input "logits_indices" [num_logits]; 1: "last_token_ids" [num_seqs]
MIN_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
# Every file TokenizerWrapper.from_pretrained reads (rtllm.llmapi.tokenizer.TOKENIZER_FILES), so chat and
# end-of-sequence ids work on the engine as on its checkpoint; chat_template.jinja is where current
# transformers saves the chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def rtllm_version() -> str:
    try:
        return importlib.metadata.version("rtllm")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def engine_file_name(rank: int) -> str:
    return f"rank{rank}.engine"


def tp_size_of(config: dict) -> int:
    """The number of tensor-parallel ranks (rank{N}.engine files) of an engine config."""
    return int((config.get("mapping") or {}).get("tp_size", 1))


def remove_stale_rank_files(engine_dir: str, tp_size: int) -> None:
    """Drops rank files beyond tp_size, left by an engine of more ranks saved there before."""
    rank = tp_size
    while os.path.isfile(os.path.join(engine_dir, engine_file_name(rank))):
        os.remove(os.path.join(engine_dir, engine_file_name(rank)))
        rank += 1


def format_config(config: dict) -> str:
    """Pretty JSON, except that each graph entry (tensor spec or node) stays on one line."""
    def dump(key, value):
        if key != "graph":
            return json.dumps(value, indent=2).replace("\n", "\n  ")
        lists = [f'    "{k}": [\n' + ",\n".join("      " + json.dumps(item) for item in items) + "\n    ]"
                 for k, items in value.items()]
        return "{\n" + ",\n".join(lists) + "\n  }"
    return "{\n" + ",\n".join(f"  {json.dumps(k)}: {dump(k, v)}" for k, v in config.items()) + "\n}\n"


class Engine:
    """An engine in memory. `weights` maps each weight the graph names to a lazy Parameter, so saving
    streams one tensor at a time; `source_dir` is where tokenizer files come from (checkpoint or engine)."""

    def __init__(self, config: dict, weights: dict, source_dir: str | None = None, rank: int = 0):
        self.config = config
        self.rank = rank  # the tensor-parallel rank whose weights these are (rank{rank}.engine)
        self.weights = weights
        self.source_dir = source_dir
        self.quantization_report = None  # what build()'s quantize pass did (None for a loaded engine)

    @property
    def model_config(self) -> dict:
        return self.config["model_config"]

    @property
    def build_config(self) -> dict:
        return self.config["build_config"]

    @property
    def graph(self) -> dict:
        return self.config["graph"]

    def save(self, engine_dir: str) -> None:
        engine_dir = str(engine_dir)
        if self.source_dir and os.path.abspath(self.source_dir) == os.path.abspath(engine_dir):
            # its config.json and weights are being read from there
            raise ValueError(f"cannot save an engine into {engine_dir}, the directory it is read from")
        os.makedirs(engine_dir, exist_ok=True)
        with open(os.path.join(engine_dir, CONFIG_FILE), "w") as f:
            f.write(format_config(self.config))
        # Wider dtypes first: every tensor then starts at a multiple of its element size.
        order = sorted(self.weights.values(), key=lambda w: -np.dtype(storage_type(w.dtype)).itemsize)
        write_safetensors(os.path.join(engine_dir, engine_file_name(self.rank)),
                          [(w.name, w.dtype, w.shape, w.load) for w in order],
                          metadata={"format": "rtllm", "format_version": FORMAT_VERSION})
        if self.rank == tp_size_of(self.config) - 1:  # the last rank: drop those of an earlier, larger engine
            remove_stale_rank_files(engine_dir, tp_size_of(self.config))
        for name in TOKENIZER_FILES:
            path, target = os.path.join(self.source_dir or "", name), os.path.join(engine_dir, name)
            if self.source_dir and os.path.isfile(path):
                shutil.copyfile(path, target)
            elif os.path.isfile(target):  # left by an engine saved there before: another tokenizer's
                os.remove(target)

    def materialize(self) -> list:
        """[(name, dtype, shape, array)] with every weight read into its engine dtype (bf16 as uint16,
        FP8 as uint8, int4 packed: uint8 [..., K / 2], shape the logical one), as save() writes them:
        what rtllm._core.Engine.from_memory takes. The arrays are the only copy of the weights (a
        weight the checkpoint stores as is may be a view of its mapped file)."""
        weights = []
        for w in self.weights.values():
            array = np.asarray(w.load())
            array = array if array.flags.c_contiguous else array.copy()  # (ascontiguousarray makes 0-d 1-d)
            if array.dtype != storage_type(w.dtype) or tuple(array.shape) != stored_shape(w.dtype, w.shape):
                raise ValueError(f"tensor {w.name!r} produced {array.dtype}{list(array.shape)}, "
                                 f"declared {w.dtype}{list(w.shape)}")
            weights.append((w.name, w.dtype, list(w.shape), array))
        return weights

    def to_core(self):
        """The C++ engine (rtllm._core.Engine) built from memory: no file is written."""
        from rtllm import _core

        return _core.Engine.from_memory(json.dumps(self.config), self.materialize())

    @classmethod
    def load(cls, engine_dir: str, rank: int = 0) -> "Engine":
        """Reads config.json and maps rank{rank}.engine; weights are read when used."""
        engine_dir = str(engine_dir)
        path = os.path.join(engine_dir, CONFIG_FILE)
        if not os.path.isfile(path):
            raise ValueError(f"no {CONFIG_FILE} in {engine_dir}: not an engine directory")
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        version = config.get("format_version") if isinstance(config, dict) else None
        if not isinstance(version, int) or not MIN_FORMAT_VERSION <= version <= FORMAT_VERSION:
            raise ValueError(f"{path}: engine format version {version} is not readable; this rtllm reads "
                             f"versions {MIN_FORMAT_VERSION} to {FORMAT_VERSION}")
        try:  # engines written before the section existed are unquantized
            check_supported(QuantConfig.from_dict(config.get("quantization") or {}))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if not 0 <= rank < tp_size_of(config):
            raise ValueError(f"{path}: rank {rank} is outside the engine's tp_size={tp_size_of(config)} ranks")
        st = SafetensorsFile(os.path.join(engine_dir, engine_file_name(rank)))
        weights = {name: Parameter(st.shape(name), st.dtype(name), lambda name=name: st.get(name), name)
                   for name in st.keys()}
        graph = config["graph"]
        activations = {t["name"] for t in graph["inputs"]} | {o for n in graph["nodes"] for o in n["outputs"]}
        missing = sorted({i for n in graph["nodes"] for i in n["inputs"]} - activations - weights.keys())
        if missing:
            raise ValueError(f"{st.path} lacks weights the graph reads: {', '.join(missing[:5])}")
        return cls(config, weights, source_dir=engine_dir, rank=rank)
