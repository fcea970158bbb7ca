"""Linears that load their own shard of each checkpoint tensor, ready for tensor parallelism (the idea of
nano-vllm's layers/linear.py and TensorRT-LLM's ColumnLinear / RowLinear).

Each weight is [out_features, in_features] as in HF. A ColumnLinear splits its output features over the
tensor-parallel ranks (dim 0), a RowLinear its input features (dim 1; the partial outputs are summed by an
all-reduce, and its bias is added once: rank 0 holds it, the other ranks zeros, so that every rank runs the
same graph). Parameters carry
`weight_loader(param, loaded[, shard_id])`: `loaded` is a lazy checkpoint tensor of the whole, unsplit
weight, and the loader keeps this rank's slice. Stacked linears (QKVColumnLinear, MergedColumnLinear) hold
several checkpoint tensors in one parameter; shard_id says which part `loaded` is.
"""

import numpy as np

from ..builder import functional as F
from ..builder.safetensors_io import storage_type
from ..builder.tensor import Parameter, Tensor
from ..mapping import Mapping
from .module import Module, check_loaded_shape, default_weight_loader


def tp_shard(array: np.ndarray, dim: int, mapping: Mapping, replicas: int = 1) -> np.ndarray:
    """This rank's contiguous piece of `array` along `dim`: 1/tp_size of it, or with `replicas` ranks holding
    each piece (KV heads fewer than the ranks), piece rank // replicas of tp_size / replicas."""
    num_pieces = mapping.tp_size // replicas
    if num_pieces == 1:
        return array
    size = array.shape[dim]
    if size % num_pieces:
        raise ValueError(f"cannot split {size} features (dim {dim}) into {num_pieces} pieces "
                         f"(tp_size={mapping.tp_size})")
    n, piece = size // num_pieces, mapping.tp_rank // replicas
    index = [slice(None)] * array.ndim
    index[dim] = slice(piece * n, (piece + 1) * n)
    return array[tuple(index)]


def tp_divide(n: int, pieces: int, what: str) -> int:
    """n / pieces: the size of each rank's piece of n features (n must split evenly)."""
    if n % pieces:
        raise ValueError(f"{what}={n} does not split into {pieces} equal pieces for tensor parallelism")
    return n // pieces


class Linear(Module):
    """y = x W^T (+ b), W [out_features, in_features]; `tp_dim` is the dim split over ranks (None: every
    rank holds it whole)."""
    tp_dim = None

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str = "float32",
                 mapping: Mapping | None = None):
        self.mapping = mapping or Mapping()
        num_out = self._rows_on_rank(out_features)
        num_in = in_features if self.tp_dim != 1 else tp_divide(in_features, self.mapping.tp_size, "in_features")
        self.weight = Parameter((num_out, num_in), dtype)
        self.weight.weight_loader = self.weight_loader
        self.bias = Parameter((num_out,), dtype) if bias else None
        if bias:
            self.bias.weight_loader = self.weight_loader

    def _rows_on_rank(self, out_features: int) -> int:
        return out_features if self.tp_dim != 0 else tp_divide(out_features, self.mapping.tp_size, "out_features")

    def weight_loader(self, param: Parameter, loaded: Parameter) -> None:
        dim = self.tp_dim if param is self.weight or self.tp_dim == 0 else None  # a row bias is whole
        if dim is None:
            default_weight_loader(param, loaded)
            if self.tp_dim == 1 and self.mapping.tp_rank != 0:  # rank 0 adds the row bias, the others zeros
                param.loader = lambda: np.zeros(param.shape, storage_type(param.dtype))
            return
        whole = list(param.shape)
        whole[dim] *= self.mapping.tp_size
        check_loaded_shape(loaded, whole)
        cast = loaded.cast(param.dtype)
        param.loader = lambda: tp_shard(cast.load(), dim, self.mapping)

    @property
    def whole_shape(self) -> tuple:
        """[out_features, in_features] of the whole weight, as the checkpoint holds it."""
        rows, cols = self.weight.shape
        tp = self.mapping.tp_size
        return rows * (tp if self.tp_dim == 0 else 1), cols * (tp if self.tp_dim == 1 else 1)

    def shard_rows(self, array: np.ndarray, shard_id=None) -> np.ndarray:
        """This rank's rows of `array`, an array over the whole weight's output features along dim 0 (of part
        shard_id in a stacked linear): codes [N, K] or per-channel scales [N] of a pre-quantized weight."""
        return tp_shard(array, 0, self.mapping) if self.tp_dim == 0 else array

    def shard_cols(self, array: np.ndarray) -> np.ndarray:
        """This rank's columns of `array` [N, K], an array over the whole weight's input features."""
        return tp_shard(array, 1, self.mapping) if self.tp_dim == 1 else array

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnLinear(Linear):
    tp_dim = 0


class RowLinear(Linear):
    tp_dim = 1

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return F.all_reduce(y) if self.mapping.tp_size > 1 else y


class _StackedLoader:
    """param.loader of a parameter stacked along dim 0 from several checkpoint tensors: each part's rows are
    filled from its own lazy tensor when the parameter is loaded (one copy of the result in memory)."""

    def __init__(self, param: Parameter, shard_ids):
        self.param, self.shard_ids, self.parts = param, list(shard_ids), {}

    def add(self, shard_id, offset: int, produce) -> None:
        self.parts[shard_id] = (offset, produce)

    def __call__(self) -> np.ndarray:
        missing = [s for s in self.shard_ids if s not in self.parts]
        if missing:
            raise ValueError(f"weight {self.param.name!r} lacks its parts {missing} (not loaded from the checkpoint)")
        out = np.empty(self.param.shape, storage_type(self.param.dtype))
        for offset, produce in self.parts.values():
            part = produce()
            out[offset:offset + part.shape[0]] = part
        return out


class StackedColumnLinear(ColumnLinear):
    """A column linear whose output features are the concatenation of parts (shard ids -> whole sizes),
    each loaded from its own checkpoint tensor; each rank holds its slice of every part, parts in order."""

    def __init__(self, in_features: int, part_sizes: dict, bias: bool = False, dtype: str = "float32",
                 mapping: Mapping | None = None, part_replicas: dict | None = None):
        mapping = mapping or Mapping()
        self.part_sizes = dict(part_sizes)
        # ranks holding the same piece of a part (tp_shard's replicas): KV heads fewer than the ranks
        self.part_replicas = {shard_id: (part_replicas or {}).get(shard_id, 1) for shard_id in self.part_sizes}
        self.part_offsets, offset = {}, 0  # rows of this rank's parameter
        for shard_id, size in self.part_sizes.items():
            self.part_offsets[shard_id] = offset
            pieces = mapping.tp_size // self.part_replicas[shard_id]
            offset += tp_divide(size, pieces, f"part {shard_id!r} size")
        self.rows_on_rank = offset
        super().__init__(in_features, sum(self.part_sizes.values()), bias, dtype, mapping)

    def _rows_on_rank(self, out_features: int) -> int:
        return self.rows_on_rank

    def shard_rows(self, array: np.ndarray, shard_id=None) -> np.ndarray:
        return tp_shard(array, 0, self.mapping, self.part_replicas[shard_id])

    def weight_loader(self, param: Parameter, loaded: Parameter, shard_id=None) -> None:
        if shard_id not in self.part_sizes:
            raise ValueError(f"{param.name}: unknown part {shard_id!r}; parts: {list(self.part_sizes)}")
        check_loaded_shape(loaded, (self.part_sizes[shard_id], *param.shape[1:]))
        if not isinstance(param.loader, _StackedLoader):
            param.loader = _StackedLoader(param, self.part_sizes)
        cast = loaded.cast(param.dtype)
        param.loader.add(shard_id, self.part_offsets[shard_id], lambda: self.shard_rows(cast.load(), shard_id))


def kv_head_replicas(num_kv_heads: int, mapping: Mapping) -> int:
    """Ranks sharing each KV head: 1 when the KV heads split evenly over the ranks, tp_size / num_kv_heads
    when there are fewer of them (MQA, and GQA with more ranks than KV heads)."""
    if num_kv_heads >= mapping.tp_size:
        tp_divide(num_kv_heads, mapping.tp_size, "num_kv_heads")
        return 1
    if mapping.tp_size % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide tp_size={mapping.tp_size} when it is smaller")
    return mapping.tp_size // num_kv_heads


class QKVColumnLinear(StackedColumnLinear):
    """q, k and v projections as one linear: rows q [nh*hd], k [nkv*hd], v [nkv*hd] (per rank: its heads; KV
    heads fewer than the ranks are replicated, each rank holding the one its query heads read)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False,
                 dtype: str = "float32", mapping: Mapping | None = None):
        replicas = kv_head_replicas(num_kv_heads, mapping or Mapping())
        super().__init__(hidden_size, {"q": num_heads * head_dim, "k": num_kv_heads * head_dim,
                                       "v": num_kv_heads * head_dim}, bias, dtype, mapping,
                         {"k": replicas, "v": replicas})


class MergedColumnLinear(StackedColumnLinear):
    """Several projections of the same input as one linear (gate and up: shard ids 0 and 1)."""

    def __init__(self, in_features: int, output_sizes: list, bias: bool = False, dtype: str = "float32",
                 mapping: Mapping | None = None):
        super().__init__(in_features, dict(enumerate(output_sizes)), bias, dtype, mapping)
