"""Reading HF checkpoint weights (one model.safetensors or shards listed in model.safetensors.index.json)
and handing them to a model's parameters through their loader hooks."""

import glob
import json
import os

from ..builder.safetensors_io import SafetensorsFile
from ..builder.tensor import Parameter
from ..nn import default_weight_loader


class Checkpoint:
    """Name -> lazy tensor over every safetensors file of a checkpoint directory."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        index_path = os.path.join(model_dir, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    file_names = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index: {e!r}") from e
        else:
            file_names = sorted(os.path.basename(p) for p in glob.glob(os.path.join(model_dir, "*.safetensors")))
        if not file_names:
            raise ValueError(f"no weights in {model_dir}: expected model.safetensors or "
                             f"model.safetensors.index.json")
        self.files = {}  # tensor name -> SafetensorsFile
        for file_name in file_names:
            path = os.path.join(model_dir, file_name)
            if not os.path.isfile(path):
                raise ValueError(f"missing weight file {path} (listed in {index_path})")
            st = SafetensorsFile(path)
            for name in st.keys():
                self.files[name] = st

    def tensor(self, name: str) -> Parameter:
        """Tensor `name` as a lazy Parameter (its data is read when loaded)."""
        st = self.files.get(name)
        if st is None:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        return Parameter(st.shape(name), st.dtype(name), lambda: st.get(name), name)


def load_weights(model, checkpoint: Checkpoint) -> None:
    """Gives every parameter of `model` its checkpoint tensors through its weight_loader (lazily: no data is
    read). A parameter stacked from several tensors (model.packed_modules_mapping) gets one call per part,
    with the part's shard id. Parameters that already have a loader are computed, not read."""
    parts_of = {}  # stacked module name -> [(checkpoint module name, shard id)]
    for checkpoint_module, (module, shard_id) in model.packed_modules_mapping.items():
        parts_of.setdefault(module, []).append((checkpoint_module, shard_id))
    for name, param in model.named_parameters():
        if param.loader is not None:
            continue
        weight_loader = param.weight_loader or default_weight_loader
        prefix, _, leaf = model.checkpoint_name(name).rpartition(".")  # model.layers.0.mlp.gate_up_proj, weight
        parent, _, module = prefix.rpartition(".")
        if module not in parts_of:
            weight_loader(param, checkpoint.tensor(f"{prefix}.{leaf}"))
            continue
        for checkpoint_module, shard_id in parts_of[module]:
            weight_loader(param, checkpoint.tensor(f"{parent}.{checkpoint_module}.{leaf}"), shard_id)
