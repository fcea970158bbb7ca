"""Module and the basic layers. Attribute names mirror torch.nn / HF so that named_parameters()
yields checkpoint names (model.layers.0.self_attn.q_proj.weight, ...)."""

from ..builder import functional as F
from ..builder.tensor import Parameter, Tensor


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


class Linear(Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: str = "float32"):
        self.weight = Parameter((out_features, in_features), dtype)  # [N, K] as in HF
        self.bias = Parameter((out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Embedding(Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: str = "float32"):
        self.weight = Parameter((num_embeddings, embedding_dim), dtype)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float, dtype: str = "float32"):
        self.weight = Parameter((dim,), dtype)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight, self.eps)
