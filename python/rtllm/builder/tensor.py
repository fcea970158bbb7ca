"""The graph IR: symbolic tensors, lazy weights (Parameter), nodes and the Network that holds them.

Tracing a model's forward() appends nodes to the current Network (entered with `with network:`).
Graph inputs, node outputs and weights are all referred to by name, as in the engine file.
"""

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .safetensors_io import cast, storage_type, stored_shape

DYNAMIC_DIMS = ("num_tokens", "num_logits")


@dataclass(eq=False)
class Tensor:
    """A symbolic activation: a graph input or a node output. Dims are ints or DYNAMIC_DIMS."""
    name: str
    dtype: str
    shape: tuple

    def spec(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


class Parameter:
    """A lazy weight: shape and dtype are known up front, data comes from `loader()` when needed.

    The loader returns a numpy array in the parameter's storage type (bf16 as uint16 bits, int4 packed as
    uint8 [..., K / 2] while `shape` is the logical one). `name` is
    set when the parameter is registered (Module.named_parameters names it by the module tree).
    `weight_loader(param, loaded, ...)`, when a layer sets one, is how checkpoint loading gives it a
    checkpoint tensor (rtllm.nn.linear: the layer keeps its shard; None: the whole tensor).
    `keep_dtype` marks weights stored in their own dtype whatever the engine dtype (quantized weights and
    their float32 scales).
    """

    def __init__(self, shape, dtype: str = "float32", loader: Callable[[], np.ndarray] | None = None,
                 name: str | None = None):
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.loader = loader
        self.name = name
        self.weight_loader = None
        self.keep_dtype = False

    def load(self) -> np.ndarray:
        if self.loader is None:
            raise ValueError(f"weight {self.name!r} {list(self.shape)} has no data (was the checkpoint loaded?)")
        array = np.asarray(self.loader())
        if tuple(array.shape) != stored_shape(self.dtype, self.shape) or array.dtype != storage_type(self.dtype):
            raise ValueError(f"weight {self.name!r}: loader produced {array.dtype}{list(array.shape)}, "
                             f"expected {self.dtype}{list(self.shape)}")
        return array

    def cast(self, dtype: str) -> "Parameter":
        """A parameter converting this one's data to `dtype` when loaded (itself if no change)."""
        if dtype == self.dtype:
            return self
        src = self.dtype
        return Parameter(self.shape, dtype, lambda: cast(self.load(), src, dtype), self.name)

    def __repr__(self):
        return f"Parameter({self.name!r}, {self.dtype}, {list(self.shape)})"


@dataclass(eq=False)
class Node:
    op: str
    inputs: list  # names of graph inputs, weights or earlier outputs
    outputs: list
    attrs: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"op": self.op, "inputs": list(self.inputs), "outputs": list(self.outputs), "attrs": dict(self.attrs)}


_network_stack: list = []  # networks being traced into; the last one is current


def current_network() -> "Network":
    if not _network_stack:
        raise RuntimeError("no current Network: trace inside `with network:`")
    return _network_stack[-1]


class Network:
    def __init__(self):
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.nodes: list[Node] = []
        self.tensors: dict[str, Tensor] = {}     # every node output
        self.weights: dict[str, Parameter] = {}  # every weight a node reads
        self._num_names = 0

    def __enter__(self):
        _network_stack.append(self)
        return self

    def __exit__(self, *exc):
        _network_stack.pop()

    def add_input(self, name: str, dtype: str, shape) -> Tensor:
        tensor = Tensor(name, dtype, tuple(shape))
        self.inputs.append(tensor)
        return tensor

    def new_name(self) -> str:
        while f"t{self._num_names}" in self.tensors:
            self._num_names += 1
        self._num_names += 1
        return f"t{self._num_names - 1}"

    def add_weight(self, param: Parameter) -> str:
        if param.name is None:
            raise ValueError(f"unnamed weight {param!r}: register it in a Module or give it a name")
        known = self.weights.get(param.name)
        if known is not None and known is not param:
            raise ValueError(f"two different weights are named {param.name!r}")
        self.weights[param.name] = param
        return param.name

    def add_node(self, op: str, inputs, out_specs, attrs=None, index: int | None = None) -> list:
        """Appends (or inserts at `index`) a node; out_specs are (dtype, shape); returns its output Tensors."""
        outputs = [Tensor(self.new_name(), dtype, tuple(shape)) for dtype, shape in out_specs]
        for t in outputs:
            self.tensors[t.name] = t
        node = Node(op, [i.name if isinstance(i, (Tensor, Parameter)) else i for i in inputs],
                    [t.name for t in outputs], dict(attrs or {}))
        self.nodes.insert(len(self.nodes) if index is None else index, node)
        return outputs

    def mark_output(self, tensor: Tensor, name: str) -> None:
        """Makes `tensor` a graph output called `name` (renaming it everywhere)."""
        old = tensor.name
        for node in self.nodes:
            node.inputs = [name if i == old else i for i in node.inputs]
            node.outputs = [name if o == old else o for o in node.outputs]
        self.tensors[name] = self.tensors.pop(old)
        tensor.name = name
        self.outputs.append(tensor)

    # -- queries used by passes -------------------------------------------------------------------

    def producers(self) -> dict:
        return {o: node for node in self.nodes for o in node.outputs}

    def consumers(self) -> dict:
        result = {}
        for node in self.nodes:
            for i in node.inputs:
                result.setdefault(i, []).append(node)
        return result

    def shape_of(self, name: str) -> tuple:
        if name in self.weights:
            return self.weights[name].shape
        if name in self.tensors:
            return self.tensors[name].shape
        return next(t.shape for t in self.inputs if t.name == name)

    def prune(self) -> None:
        """Drops nodes whose outputs nobody reads, then unused tensors and weights."""
        live = {t.name for t in self.outputs}
        kept = []
        for node in reversed(self.nodes):
            if any(o in live for o in node.outputs):
                kept.append(node)
                live.update(node.inputs)
        self.nodes = kept[::-1]
        produced = {o for node in self.nodes for o in node.outputs}
        self.tensors = {n: t for n, t in self.tensors.items() if n in produced}
        self.weights = {n: w for n, w in self.weights.items() if n in live}

    def renumber(self) -> None:
        """Renames node outputs t0, t1, ... in execution order (graph outputs keep their names)."""
        keep = {t.name for t in self.outputs}
        order = [o for node in self.nodes for o in node.outputs if o not in keep]
        mapping = {old: f"t{i}" for i, old in enumerate(order)}
        for node in self.nodes:
            node.inputs = [mapping.get(i, i) for i in node.inputs]
            node.outputs = [mapping.get(o, o) for o in node.outputs]
        tensors = {}
        for old, tensor in self.tensors.items():
            tensor.name = mapping.get(old, old)
            tensors[tensor.name] = tensor
        self.tensors = tensors
        self._num_names = len(order)

    def to_json(self) -> dict:
        return {
            "inputs": [t.spec() for t in self.inputs],
            "outputs": [t.spec() for t in self.outputs],
            "tensors": [self.tensors[o].spec() for node in self.nodes for o in node.outputs],
            "nodes": [node.to_json() for node in self.nodes],
        }
