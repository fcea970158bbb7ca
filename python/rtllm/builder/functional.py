"""Ops that append nodes to the current Network; names, inputs and attrs follow docs/engine_format.md.

Activations are float32 in the graph (a device may compute in another dtype). Shapes use
T = "num_tokens" and R = "num_seqs".
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


def embedding(ids: Tensor, table: Parameter) -> Tensor:
    """[T] int32, [V, H] -> [T, H]"""
    _check(len(table.shape) == 2, f"embedding table {table.name} must be 2-D, got {list(table.shape)}")
    return _node("embedding", [ids, table], [(ACT, (*ids.shape, table.shape[1]))])[0]


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


def mul(a: Tensor, b: Tensor) -> Tensor:
    _check(a.shape == b.shape, f"mul: shapes {list(a.shape)} and {list(b.shape)} differ")
    return _node("mul", [a, b], [(ACT, a.shape)])[0]


def silu(x: Tensor) -> Tensor:
    return _node("silu", [x], [(ACT, x.shape)])[0]


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


def rope(x: Tensor, positions: Tensor, inv_freq: Parameter, head_dim: int) -> Tensor:
    """Rotate-half RoPE on each head of x [T, n * head_dim]; inv_freq [head_dim / 2] float32."""
    _check(x.shape[-1] % head_dim == 0, f"rope: width {x.shape[-1]} is not a multiple of head_dim {head_dim}")
    _check(inv_freq.shape == (head_dim // 2,), f"rope: inv_freq must be [{head_dim // 2}], got {list(inv_freq.shape)}")
    return _node("rope", [x, positions, inv_freq], [(ACT, x.shape)], {"head_dim": int(head_dim)})[0]


def attention(q: Tensor, k: Tensor, v: Tensor, *, layer_idx: int, num_heads: int, num_kv_heads: int,
              head_dim: int, scale: float) -> Tensor:
    """Causal paged attention over each sequence's cached and new tokens (unfused form: q, k, v
    already normed and rotated). q [T, nh*hd], k/v [T, nkv*hd] -> [T, nh*hd]. Passes fold the
    preceding projections, norms and RoPE into it (attrs fused_qkv, qk_norm, rope)."""
    _check(num_heads % num_kv_heads == 0, f"attention: num_heads {num_heads} is not a multiple of "
                                          f"num_kv_heads {num_kv_heads}")
    _check(q.shape[-1] == num_heads * head_dim, f"attention: q width {q.shape[-1]} != {num_heads}*{head_dim}")
    for t in (k, v):
        _check(t.shape[-1] == num_kv_heads * head_dim, f"attention: k/v width {t.shape[-1]} != "
                                                       f"{num_kv_heads}*{head_dim}")
    attrs = {"layer_idx": int(layer_idx), "num_heads": int(num_heads), "num_kv_heads": int(num_kv_heads),
             "head_dim": int(head_dim), "scale": float(scale), "fused_qkv": False, "rope": False, "qk_norm": False}
    return _node("attention", [q, k, v], [(ACT, q.shape)], attrs)[0]


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """[T, H], [R] int32 -> [R, H]"""
    return _node("gather_rows", [x, index], [(ACT, (*index.shape, x.shape[-1]))])[0]
