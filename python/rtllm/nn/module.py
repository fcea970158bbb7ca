"""Module, ModuleList and the default weight loader. Attribute names mirror torch.nn / HF so that
named_parameters() yields checkpoint-like names (model.layers.0.self_attn.qkv_proj.weight, ...)."""

from ..builder.tensor import Parameter


class Module:
    def named_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in vars(self).items():
            if isinstance(child, Module):
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name)
            elif isinstance(child, ModuleList):
                for i, item in enumerate(child):
                    yield from item.named_modules(f"{prefix}.{name}.{i}" if prefix else f"{name}.{i}")

    def named_parameters(self):
        """(name, Parameter) pairs; a shared parameter (tied embeddings) appears once, first name wins."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter) and id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{prefix}.{name}" if prefix else name), value

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)


class ModuleList(list):
    """A list of modules named by index, like torch.nn.ModuleList."""


def check_loaded_shape(loaded: Parameter, shape: tuple) -> None:
    """`loaded` is a checkpoint tensor; `shape` the whole (unsharded) shape the model config implies."""
    if tuple(loaded.shape) != tuple(shape):
        raise ValueError(f"tensor {loaded.name!r} from the checkpoint has shape {list(loaded.shape)}, but "
                         f"config.json implies {list(shape)}")


def default_weight_loader(param: Parameter, loaded: Parameter) -> None:
    """For a parameter every rank holds whole: the checkpoint tensor, converted to param's dtype on load."""
    check_loaded_shape(loaded, param.shape)
    param.loader = loaded.cast(param.dtype).load
