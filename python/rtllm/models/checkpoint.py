"""Reading HF checkpoint weights: one model.safetensors or shards listed in model.safetensors.index.json."""

import glob
import json
import os

from ..builder.safetensors_io import SafetensorsFile
from ..builder.tensor import Parameter


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

    def parameter(self, name: str, shape: tuple) -> Parameter:
        """A lazy Parameter for tensor `name`, checked against the shape the model config implies."""
        st = self.files.get(name)
        if st is None:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.model_dir}")
        if st.shape(name) != tuple(shape):
            raise ValueError(f"tensor {name!r} in {st.path} has shape {list(st.shape(name))}, but config.json "
                             f"implies {list(shape)}")
        return Parameter(shape, st.dtype(name), lambda: st.get(name), name)
