"""GGUF files (llama.cpp's single-file format) as models: the config from the file's metadata, the weights
under their Hugging Face names (the linears of Q8_0, Q4_0 and Q4_1 blocks kept quantized: gguf_quant.py;
every other tensor dequantized to float32 when read), and the tokenizer (gguf_tokenizer.py).

    model = AutoModelForCausalLM.from_hugging_face("model.gguf")   # or LLM(model="model.gguf")

The `gguf` package (pip install gguf) reads the file; rtllm imports it only when a GGUF file is used.

llama.cpp's converter permutes the rows of a llama model's q and k projections (its rope rotates adjacent
pairs of a head, HF's rotates the two halves); the rows are put back in HF order here. The permutation moves
whole rows, so it applies to the quantized blocks too, which run along a row.

decode_q8_0 / decode_q4_0 / decode_q4_1 turn the blocks of those types into integer codes and scales
without going through float: W[n, k] = q[n, k] * scale[n, k // 32] + offset[n, k // 32].
"""

import os
import re
import sys

import numpy as np

from ..builder.tensor import Parameter
from .checkpoint import load_weights

# general.architecture -> (rtllm architecture, q/k rows permuted by llama.cpp's converter)
ARCHITECTURES = {"llama": ("LlamaForCausalLM", True), "qwen2": ("Qwen2ForCausalLM", False)}
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANTIZED_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")  # readable; see gguf_quant.py for kept ones
BLOCK = 32  # elements of one Q8_0 / Q4_0 / Q4_1 block

# GGUF tensor name (after "blk.N.") -> HF module of layer N
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def import_gguf():
    """The gguf package, or an ImportError saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf "
                          "(or pip install 'rtllm[gguf]')") from e
    return gguf


def is_gguf_file(path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_gguf(path: str) -> str | None:
    """The GGUF file `path` names: itself (a *.gguf path, which must exist), or the only *.gguf file of a
    directory without config.json; None for anything else (an HF checkpoint or an engine directory)."""
    path = str(path)
    if is_gguf_file(path) and not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ValueError(f"GGUF file {path!r} does not exist")
        return path
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        found = sorted(f for f in os.listdir(path) if is_gguf_file(f))
        if len(found) == 1:
            return os.path.join(path, found[0])
    return None


def hf_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor (blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight);
    None for one that has none (rope_freqs)."""
    base, _, leaf = gguf_name.rpartition(".")
    if base.startswith("blk.") and base.count(".") == 2:
        _, layer, part = base.split(".")
        module = _LAYER_NAMES.get(part)
        return None if module is None else f"model.layers.{layer}.{module}.{leaf}"
    module = _TOP_NAMES.get(base)
    return None if module is None else f"{module}.{leaf}"


def unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row indices that undo llama.cpp's q/k permutation: hf_rows = gguf_rows[index].

    llama.cpp stores head h's row (h, i, j) of HF's layout [heads, 2 halves, dim/2] at (h, j, i) of
    [heads, dim/2, 2] (convert_hf_to_gguf.py, LlamaModel.permute)."""
    if num_rows % (2 * num_heads):
        raise ValueError(f"{num_rows} q/k rows do not split into {num_heads} heads of an even size")
    half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, half, 2).transpose(0, 2, 1).reshape(-1)


class GGUFFile:
    """A GGUF model file: its metadata, and its tensors by HF name (lazily, dequantized when loaded)."""

    def __init__(self, path: str):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"GGUF file {self.path!r} does not exist")
        gguf = import_gguf()
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, KeyError, IndexError, OSError) as e:  # an unknown type enum, a truncated file
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
            if unknown:
                raise ValueError(f"{self.path}: a tensor has type {unknown.group(1)}, which is no GGUF tensor type "
                                 f"rtllm (or the gguf package) knows; supported: "
                                 f"{', '.join(FLOAT_TYPES + QUANTIZED_TYPES)}") from e
            raise ValueError(f"{self.path} cannot be read as a GGUF file: {e}") from e
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"{self.path}: GGUF architecture {self.architecture!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        self.tensors = {}  # HF name -> ReaderTensor
        self.rope_freqs = None  # llama3 rope scaling, as llama.cpp stores it
        for tensor in self.reader.tensors:
            type_name = tensor.tensor_type.name
            if type_name not in FLOAT_TYPES + QUANTIZED_TYPES:
                raise ValueError(f"{self.path}: tensor {tensor.name!r} has type {type_name}, which rtllm does "
                                 f"not read; supported: {', '.join(FLOAT_TYPES + QUANTIZED_TYPES)}")
            name = hf_name(tensor.name)
            if name is not None:
                self.tensors[name] = tensor
            elif tensor.name == "rope_freqs.weight":
                self.rope_freqs = tensor
            else:
                raise ValueError(f"{self.path}: tensor {tensor.name!r} has no place in a "
                                 f"{self.architecture} model")
        self._permuted = {}  # HF name -> number of heads whose rows llama.cpp permuted

    def field(self, key: str, default=None):
        """Metadata value `key` (str, int, float, bool or list), or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def arch_field(self, key: str, default=None):
        return self.field(f"{self.architecture}.{key}", default)

    def require(self, key: str):
        value = self.arch_field(key)
        if value is None:
            raise ValueError(f"{self.path}: metadata {self.architecture}.{key} is missing")
        return value

    def hf_config(self) -> dict:
        """The metadata as the config.json of an HF checkpoint of the same model."""
        num_heads = int(self.require("attention.head_count"))
        hidden = int(self.require("embedding_length"))
        head_dim = int(self.arch_field("attention.key_length", hidden // num_heads))
        rope_dim = self.arch_field("rope.dimension_count")
        if rope_dim is not None and int(rope_dim) != head_dim:
            raise ValueError(f"{self.path}: rope.dimension_count={rope_dim} is not head_dim={head_dim}; partial "
                             f"rotary embeddings are not supported")
        if "model.embed_tokens.weight" not in self.tensors:
            raise ValueError(f"{self.path}: no token_embd.weight tensor")
        vocab_size = self.shape("model.embed_tokens.weight")[0]  # the model's rows, padding included
        bos, eos = self.field("tokenizer.ggml.bos_token_id"), self.field("tokenizer.ggml.eos_token_id")
        hf = {
            "architectures": [ARCHITECTURES[self.architecture][0]],
            "vocab_size": int(vocab_size),
            "hidden_size": hidden,
            "num_hidden_layers": int(self.require("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self.arch_field("attention.head_count_kv", num_heads)),
            "head_dim": head_dim,
            "intermediate_size": int(self.require("feed_forward_length")),
            "max_position_embeddings": int(self.require("context_length")),
            "rms_norm_eps": float(self.arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.arch_field("rope.freq_base", 10000.0)),
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors,
            "dtype": "float32",
            "bos_token_id": None if bos is None else int(bos),
            "eos_token_id": None if eos is None else int(eos),
        }
        if self.architecture == "qwen2" and self.arch_field("attention.sliding_window") is None:
            hf["use_sliding_window"] = False
        return hf

    def rope_divisors(self, head_dim: int) -> np.ndarray | None:
        """Per-frequency divisors of rope's inverse frequencies, when the file scales them: rope_freqs
        (llama3's scaling, stored as a tensor by llama.cpp) and linear scaling (rope.scaling.factor)."""
        divisors = np.ones(head_dim // 2, np.float64)
        scaled = False
        if self.rope_freqs is not None:
            factors = _dequantize(self.rope_freqs.data, self.rope_freqs.tensor_type).astype(np.float64).reshape(-1)
            if factors.size != head_dim // 2:
                raise ValueError(f"{self.path}: rope_freqs has {factors.size} factors, head_dim / 2 is "
                                 f"{head_dim // 2}")
            divisors, scaled = divisors * factors, True
        scaling = self.arch_field("rope.scaling.type")
        if scaling not in (None, "none"):
            if scaling != "linear":
                raise ValueError(f"{self.path}: rope scaling {scaling!r} is not supported (supported: linear, "
                                 f"llama3's rope_freqs)")
            divisors, scaled = divisors * float(self.require("rope.scaling.factor")), True
        return divisors if scaled else None

    def permute_qk(self, num_heads: int, num_kv_heads: int) -> None:
        """Records which tensors' rows to put back in HF order (llama only)."""
        if not ARCHITECTURES[self.architecture][1]:
            return
        for name in self.tensors:
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
                self._permuted[name] = num_heads
            elif name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
                self._permuted[name] = num_kv_heads

    def rows(self, name: str) -> np.ndarray:
        """Tensor `name`'s stored rows (raw blocks for a quantized type) in HF row order."""
        tensor = self.tensors[name]
        data = tensor.data  # [rows, elements or block bytes], a view of the mapped file
        heads = self._permuted.get(name)
        return data if heads is None else data[unpermute_rows(data.shape[0], heads)]

    def shape(self, name: str) -> tuple:
        return tuple(int(d) for d in reversed(self.tensors[name].shape))

    def float32(self, name: str) -> np.ndarray:
        """Tensor `name` in float32, HF shape and row order."""
        data = _dequantize(self.rows(name), self.tensors[name].tensor_type)
        return np.ascontiguousarray(data.reshape(self.shape(name)))

    def codes(self, name: str) -> tuple:
        """Tensor `name` (Q8_0, Q4_0 or Q4_1, HF row order) as (q, scale, offset): decode_blocks."""
        tensor = self.tensors[name]
        return decode_blocks(self.rows(name), tensor.tensor_type.name, self.shape(name))

    def tensor(self, name: str) -> Parameter:
        """Tensor `name` as a lazy float32 Parameter (the Checkpoint interface of load_weights)."""
        if name not in self.tensors:
            raise ValueError(f"tensor {name!r} is missing from {self.path}")
        return Parameter(self.shape(name), "float32", lambda: self.float32(name), name)

    def quantized_types(self) -> list:
        return sorted({t.tensor_type.name for t in self.tensors.values()} & set(QUANTIZED_TYPES))


def _dequantize(data: np.ndarray, tensor_type) -> np.ndarray:
    return np.asarray(import_gguf().quants.dequantize(np.asarray(data), tensor_type), np.float32)


def config_from_gguf(path: str) -> tuple:
    """(GGUFFile, model class, ModelConfig) of a GGUF file."""
    from .registry import model_class

    gguf_file = GGUFFile(path)
    hf = gguf_file.hf_config()
    cls = model_class(hf, path)
    # model_dir is the file itself: no generation_config.json is read beside it
    return gguf_file, cls, cls.config_from_hf(hf, path, path)


def model_from_gguf(path: str, dtype: str = "auto", mapping=None):
    """The rtllm model of a GGUF file, every weight a lazy float32 read (dequantized when loaded), and its
    Q8_0 / Q4_0 / Q4_1 linears marked to keep their blocks (model.prequantized: gguf_quant.py). dtype "auto"
    keeps float32; float16 / bfloat16 convert on load."""
    from ..builder.build import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use {', '.join(DTYPES)}")
    gguf_file, cls, config = config_from_gguf(str(path))
    if dtype != "auto":
        config.dtype = dtype
    gguf_file.permute_qk(config.num_heads, config.num_kv_heads)
    model = cls(config, mapping)
    model.source_dir = None  # no tokenizer files: gguf_tokenizer builds the tokenizer from the metadata
    model.gguf_path = gguf_file.path
    load_weights(model, gguf_file)
    divisors = gguf_file.rope_divisors(config.head_dim)
    if divisors is not None:
        dim = config.head_dim
        base = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        model.rope.inv_freq.loader = lambda: (base / divisors).astype(np.float32)
    model.process_weights_after_loading()
    from .gguf_quant import keep_quantized

    model.prequantized = keep_quantized(model, gguf_file)
    kept = set(model.prequantized.types()) if model.prequantized else set()
    dequantized = [t for t in gguf_file.quantized_types() if t not in kept]
    if dequantized:
        print(f"note: {os.path.basename(gguf_file.path)}: {', '.join(dequantized)} weights are dequantized to "
              f"float32", file=sys.stderr)
    return model


# Block decoders: integer codes and scales, no float arithmetic on the codes.

def _blocks(raw: np.ndarray, shape, block_bytes: int, type_name: str) -> np.ndarray:
    """raw (uint8, any shape holding N * K / 32 blocks in row order) as [N, K / 32, block_bytes]."""
    n, k = (int(d) for d in shape)
    if k % BLOCK:
        raise ValueError(f"{type_name}: K={k} is not a multiple of the block size {BLOCK}")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.size != n * (k // BLOCK) * block_bytes:
        raise ValueError(f"{type_name}: expected {n * (k // BLOCK) * block_bytes} bytes (uint8) for [{n}, {k}], "
                         f"got {raw.dtype} of {raw.size}")
    return raw.reshape(n, k // BLOCK, block_bytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[N, B, 16] packed bytes -> [N, B * 32] signed int8 u - 8: within a block, the low nibbles are
    elements 0..15 and the high nibbles 16..31 (ggml's order)."""
    low, high = qs & np.uint8(0x0F), qs >> np.uint8(4)
    u = np.concatenate([low, high], axis=-1)  # [N, B, 32]
    return (u.astype(np.int8) - np.int8(8)).reshape(qs.shape[0], -1)


def decode_q8_0(raw: np.ndarray, shape) -> tuple:
    """Q8_0 blocks (f16 d, 32 int8) of a [N, K] tensor -> (q int8 [N, K], scale float16 [N, K/32], None)."""
    blocks = _blocks(raw, shape, 34, "Q8_0")
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(blocks.shape[0], -1)
    return q, scale, None


def decode_q4_0(raw: np.ndarray, shape) -> tuple:
    """Q4_0 blocks (f16 d, 16 bytes of nibbles u; w = (u - 8) d) of a [N, K] tensor ->
    (q int8 [N, K] in [-8, 7], scale float16 [N, K/32], None)."""
    blocks = _blocks(raw, shape, 18, "Q4_0")
    scale = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    return _nibbles(blocks[..., 2:]), scale, None


def decode_q4_1(raw: np.ndarray, shape) -> tuple:
    """Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles u; w = u d + m) of a [N, K] tensor ->
    (q int8 [N, K] = u - 8, scale float16 [N, K/32] = d, offset float32 [N, K/32] = m + 8 d)."""
    blocks = _blocks(raw, shape, 20, "Q4_1")
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    offset = m.astype(np.float32) + np.float32(8) * d.astype(np.float32)
    return _nibbles(blocks[..., 4:]), d, offset


BLOCK_DECODERS = {"Q8_0": decode_q8_0, "Q4_0": decode_q4_0, "Q4_1": decode_q4_1}


def decode_blocks(raw: np.ndarray, type_name: str, shape) -> tuple:
    """(q, scale, offset) of a tensor stored as `type_name` blocks: W[n, k] = float(q[n, k]) *
    scale[n, k // 32] + offset[n, k // 32] (offset None: 0)."""
    decoder = BLOCK_DECODERS.get(type_name)
    if decoder is None:
        raise ValueError(f"no integer decoding of GGUF type {type_name}; supported: {', '.join(BLOCK_DECODERS)}")
    return decoder(raw, shape)
