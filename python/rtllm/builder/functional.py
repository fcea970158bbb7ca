"""Ops that append nodes to the current Network; names, inputs and attrs follow docs/engine_format.md.

Activations are float32 in the graph (a device may compute in another dtype). Shapes use
T = "num_tokens" and R = "num_logits" (the rows whose logits the step computes).
"""

from .tensor import Parameter, Tensor, current_network

ACT = "float32"


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _node(op, inputs, out_specs, attrs=None):
    network = current_network()
    for i in inputs:
        if isinstance(i, Parameter):
            network.add_weight(i)
    return network.add_node(op, inputs, out_specs, attrs)


def embedding(ids: Tensor, table: Parameter, vocab_parallel: bool = False) -> Tensor:
    """[T] int32, [V, H] -> [T, H]. vocab_parallel: the table is this tensor-parallel rank's slice of the
    vocabulary (rows [rank V, (rank + 1) V) of the whole), and ids outside it give zero rows, so that an
    all_reduce over the ranks completes the lookup."""
    _check(len(table.shape) == 2, f"embedding table {table.name} must be 2-D, got {list(table.shape)}")
    attrs = {"vocab_parallel": True} if vocab_parallel else None
    return _node("embedding", [ids, table], [(ACT, (*ids.shape, table.shape[1]))], attrs)[0]


def linear(x: Tensor, weight: Parameter, bias: Parameter | None = None) -> Tensor:
    """[T, K] x [N, K] (+ [N]) -> [T, N]"""
    num_out, num_in = weight.shape
    _check(x.shape[-1] == num_in, f"linear {weight.name}: input has {x.shape[-1]} features, weight "
                                  f"{list(weight.shape)} expects {num_in}")
    _check(bias is None or bias.shape == (num_out,), f"linear bias {bias and bias.name} must be [{num_out}]")
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return _node("linear", inputs, [(ACT, (*x.shape[:-1], num_out))])[0]


def rms_norm(x: Tensor, weight: Parameter, eps: float) -> Tensor:
    """Normalizes each run of d = weight size values of the last dim (d divides it)."""
    (d,) = weight.shape
    _check(x.shape[-1] % d == 0, f"rms_norm {weight.name}: weight size {d} does not divide {x.shape[-1]}")
    return _node("rms_norm", [x, weight], [(ACT, x.shape)], {"eps": float(eps)})[0]


def add(a: Tensor, b: Tensor) -> Tensor:
    _check(a.shape == b.shape, f"add: shapes {list(a.shape)} and {list(b.shape)} differ")
    return _node("add", [a, b], [(ACT, a.shape)])[0]


def silu_mul(x: Tensor) -> Tensor:
    """[T, 2I] -> [T, I] = silu(x[:, :I]) * x[:, I:]"""
    _check(x.shape[-1] % 2 == 0, f"silu_mul: last dim {x.shape[-1]} is odd")
    return _node("silu_mul", [x], [(ACT, (*x.shape[:-1], x.shape[-1] // 2))])[0]


def add_rms_norm(x: Tensor, residual: Tensor, weight: Parameter, eps: float) -> tuple:
    """-> (rms_norm(x + residual), x + residual)"""
    _check(x.shape == residual.shape, f"add_rms_norm: shapes {list(x.shape)} and {list(residual.shape)} differ")
    _check(weight.shape == (x.shape[-1],), f"add_rms_norm {weight.name}: weight must be [{x.shape[-1]}]")
    normed, total = _node("add_rms_norm", [x, residual, weight], [(ACT, x.shape), (ACT, x.shape)], {"eps": float(eps)})
    return normed, total


def attention(qkv: Tensor, positions: Tensor, inv_freq: Parameter, qk_norm: tuple | None = None, *,
              layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> Tensor:
    """Causal paged attention over each sequence's cached and new tokens. qkv [T, (nh + 2 nkv) hd] (rows of
    q, k, v), positions [T], inv_freq [hd / 2] float32 -> [T, nh hd]. qk_norm (q_norm [hd], k_norm [hd], eps)
    normalizes each head of q and k before RoPE (Qwen3)."""
    _check(num_heads % num_kv_heads == 0, f"attention: num_heads {num_heads} is not a multiple of "
                                          f"num_kv_heads {num_kv_heads}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    _check(qkv.shape[-1] == width, f"attention: qkv width {qkv.shape[-1]} != ({num_heads} + 2*{num_kv_heads})*"
                                   f"{head_dim}")
    _check(inv_freq.shape == (head_dim // 2,), f"attention: inv_freq must be [{head_dim // 2}], got "
                                               f"{list(inv_freq.shape)}")
    attrs = {"layer_idx": int(layer_idx), "num_heads": int(num_heads), "num_kv_heads": int(num_kv_heads),
             "head_dim": int(head_dim), "scale": float(scale), "fused_qkv": True, "rope": True,
             "qk_norm": qk_norm is not None}
    inputs = [qkv, positions, inv_freq]
    if qk_norm is not None:
        q_norm, k_norm, eps = qk_norm
        _check(q_norm.shape == k_norm.shape == (head_dim,), f"attention: q/k norm weights must be [{head_dim}]")
        inputs += [q_norm, k_norm]
        attrs["qk_norm_eps"] = float(eps)
    return _node("attention", inputs, [(ACT, (*qkv.shape[:-1], num_heads * head_dim))], attrs)[0]


def all_reduce(x: Tensor) -> Tensor:
    """The sum of x over the tensor-parallel ranks (each holds a partial result of the same shape)."""
    return _node("all_reduce", [x], [(ACT, x.shape)])[0]


def gather(x: Tensor, tp_size: int, root: int = 0) -> Tensor:
    """[R, C] on each of tp_size ranks -> [R, tp_size C] on the root, rank r's columns at [r C, (r + 1) C)
    (the vocabulary-parallel LM head's logits; the other ranks' result is not written: only the root
    samples)."""
    _check(len(x.shape) == 2, f"gather: input must be 2-D, got {list(x.shape)}")
    return _node("gather", [x], [(ACT, (x.shape[0], x.shape[1] * tp_size))], {"root": int(root)})[0]


def gather_columns(x: Tensor, index: Parameter) -> Tensor:
    """[T, K], index [C] int32 (a weight) -> [T, C] = x[:, index]"""
    _check(len(x.shape) == 2 and len(index.shape) == 1, f"gather_columns: x {list(x.shape)}, index "
           f"{list(index.shape)}: need 2-D x and a 1-D index")
    return _node("gather_columns", [x, index], [(ACT, (x.shape[0], index.shape[0]))])[0]


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """[T, H], [R] int32 -> [R, H]"""
    return _node("gather_rows", [x, index], [(ACT, (*index.shape, x.shape[-1]))])[0]
