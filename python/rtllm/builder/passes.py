"""Graph rewrites run by build(). Each matches a small pattern and replaces it with the fused op of
docs/engine_format.md, keeping the semantics; a pattern that does not match exactly is left alone.
Run prune() afterwards to drop the dead weights and tensors.
"""

import numpy as np

from .tensor import Network, Node, Parameter


def _attention_roles(fused_qkv: bool, rope: bool, qk_norm: bool) -> list:
    """The attention node's input order (docs/engine_format.md)."""
    return (["qkv"] if fused_qkv else ["q", "k", "v"]) + (["positions", "inv_freq"] if rope else []) \
        + (["q_norm", "k_norm"] if qk_norm else [])


def _attention_operands(node: Node) -> dict:
    """Names of an attention node's inputs by role."""
    a = node.attrs
    return dict(zip(_attention_roles(a["fused_qkv"], a["rope"], a["qk_norm"]), node.inputs))


def _set_attention_operands(node: Node, ops: dict) -> None:
    flags = {"fused_qkv": "qkv" in ops, "rope": "positions" in ops, "qk_norm": "q_norm" in ops}
    node.attrs.update(flags)
    node.inputs = [ops[r] for r in _attention_roles(**flags)]


def _single_use(net_consumers: dict, name: str, consumer: Node) -> bool:
    return [id(n) for n in net_consumers.get(name, [])] == [id(consumer)]


def _remove(net: Network, nodes) -> None:
    dead = {id(n) for n in nodes}
    net.nodes = [n for n in net.nodes if id(n) not in dead]


def _producer(net_producers: dict, name: str, op: str) -> Node | None:
    node = net_producers.get(name)
    return node if node is not None and node.op == op else None


def _concat_weights(net: Network, names: list, new_name: str) -> Parameter:
    """A lazy weight stacking `names` along dim 0 (rows), read one part at a time when saved."""
    parts = [net.weights[n] for n in names]
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    param = Parameter(shape, parts[0].dtype, lambda: np.concatenate([p.load() for p in parts]), new_name)
    net.add_weight(param)
    return param


def _fusable_linears(net: Network, linears: list) -> bool:
    """Same input, same weight dtype and trailing shape, and all or none with a bias."""
    if any(n is None for n in linears):
        return False
    weights = [net.weights[n.inputs[1]] for n in linears]
    return (len({n.inputs[0] for n in linears}) == 1 and len({len(n.inputs) for n in linears}) == 1
            and len({(w.dtype, w.shape[1:]) for w in weights}) == 1)


def fold_rope(net: Network) -> None:
    """rope(q), rope(k) -> attention(rope=True, ..., positions, inv_freq)."""
    producers, consumers = net.producers(), net.consumers()
    for node in [n for n in net.nodes if n.op == "attention" and not n.attrs["rope"] and not n.attrs["fused_qkv"]]:
        ops = _attention_operands(node)
        rq, rk = _producer(producers, ops["q"], "rope"), _producer(producers, ops["k"], "rope")
        if (rq is None or rk is None or rq.inputs[1:] != rk.inputs[1:] or ops["q"] == ops["k"]
                or {rq.attrs["head_dim"], rk.attrs["head_dim"]} != {node.attrs["head_dim"]}
                or not _single_use(consumers, ops["q"], node) or not _single_use(consumers, ops["k"], node)):
            continue
        ops.update(q=rq.inputs[0], k=rk.inputs[0], positions=rq.inputs[1], inv_freq=rq.inputs[2])
        _set_attention_operands(node, ops)
        _remove(net, [rq, rk])


def fold_qk_norm(net: Network) -> None:
    """Per-head rms_norm of q and k feeding attention -> attention(qk_norm=True). Attention applies
    qk_norm before RoPE, so this only matches q/k that reach it without a rope node in between."""
    producers, consumers = net.producers(), net.consumers()
    for node in [n for n in net.nodes if n.op == "attention" and not n.attrs["qk_norm"] and not n.attrs["fused_qkv"]]:
        ops = _attention_operands(node)
        nq, nk = _producer(producers, ops["q"], "rms_norm"), _producer(producers, ops["k"], "rms_norm")
        head_dim = (node.attrs["head_dim"],)
        if (nq is None or nk is None or nq.attrs["eps"] != nk.attrs["eps"] or ops["q"] == ops["k"]
                or net.shape_of(nq.inputs[1]) != head_dim or net.shape_of(nk.inputs[1]) != head_dim
                or not _single_use(consumers, ops["q"], node) or not _single_use(consumers, ops["k"], node)):
            continue
        ops.update(q=nq.inputs[0], k=nk.inputs[0], q_norm=nq.inputs[1], k_norm=nk.inputs[1])
        _set_attention_operands(node, ops)
        node.attrs["qk_norm_eps"] = nq.attrs["eps"]
        _remove(net, [nq, nk])


def fuse_qkv(net: Network) -> None:
    """linear(x, Wq), linear(x, Wk), linear(x, Wv) -> linear(x, qkv_proj) [T, (nh + 2 nkv) hd]."""
    producers, consumers = net.producers(), net.consumers()
    for node in [n for n in net.nodes if n.op == "attention" and not n.attrs["fused_qkv"]]:
        ops = _attention_operands(node)
        linears = [_producer(producers, ops[r], "linear") for r in "qkv"]
        if (not _fusable_linears(net, linears) or len({ops[r] for r in "qkv"}) != 3
                or not all(_single_use(consumers, ops[r], node) for r in "qkv")
                or ".q_proj." not in linears[0].inputs[1]):
            continue
        prefix = linears[0].inputs[1].rsplit(".q_proj.", 1)[0] + ".qkv_proj"
        inputs = [linears[0].inputs[0], _concat_weights(net, [n.inputs[1] for n in linears], prefix + ".weight")]
        if len(linears[0].inputs) == 3:
            inputs.append(_concat_weights(net, [n.inputs[2] for n in linears], prefix + ".bias"))
        index = min(net.nodes.index(n) for n in linears)
        (qkv,) = net.add_node("linear", inputs, [("float32", (*net.shape_of(ops["q"])[:-1], inputs[1].shape[0]))],
                              index=index)
        for r in "qkv":
            del ops[r]
        ops["qkv"] = qkv.name
        _set_attention_operands(node, ops)
        _remove(net, linears)


def fuse_gate_up(net: Network) -> None:
    """mul(silu(linear(x, Wg)), linear(x, Wu)) -> silu_mul(linear(x, gate_up_proj))."""
    producers, consumers = net.producers(), net.consumers()
    for mul in [n for n in net.nodes if n.op == "mul"]:
        silu = _producer(producers, mul.inputs[0], "silu")
        gate = silu and _producer(producers, silu.inputs[0], "linear")
        up = _producer(producers, mul.inputs[1], "linear")
        if (gate is None or up is None or not _fusable_linears(net, [gate, up])
                or not _single_use(consumers, silu.inputs[0], silu) or not _single_use(consumers, mul.inputs[0], mul)
                or not _single_use(consumers, mul.inputs[1], mul) or ".gate_proj." not in gate.inputs[1]):
            continue
        prefix = gate.inputs[1].rsplit(".gate_proj.", 1)[0] + ".gate_up_proj"
        inputs = [gate.inputs[0], _concat_weights(net, [gate.inputs[1], up.inputs[1]], prefix + ".weight")]
        if len(gate.inputs) == 3:
            inputs.append(_concat_weights(net, [gate.inputs[2], up.inputs[2]], prefix + ".bias"))
        (gate_up,) = net.add_node("linear", inputs, [("float32", (*net.shape_of(mul.inputs[1])[:-1],
                                                                   inputs[1].shape[0]))],
                                  index=min(net.nodes.index(gate), net.nodes.index(up)))
        # silu_mul takes over the mul's output name, so its readers need no change
        net.nodes[net.nodes.index(mul)] = Node("silu_mul", [gate_up.name], list(mul.outputs))
        _remove(net, [gate, silu, up])


def fuse_add_rms_norm(net: Network) -> None:
    """s = add(residual, x); n = rms_norm(s) -> [n, s] = add_rms_norm(x, residual) (s may have other readers)."""
    producers = net.producers()
    for norm in [n for n in net.nodes if n.op == "rms_norm"]:
        add = _producer(producers, norm.inputs[0], "add")
        if add is None or net.shape_of(norm.inputs[1]) != net.shape_of(add.outputs[0])[-1:]:
            continue
        fused = Node("add_rms_norm", [add.inputs[1], add.inputs[0], norm.inputs[1]],
                     [norm.outputs[0], add.outputs[0]], {"eps": norm.attrs["eps"]})
        net.nodes[net.nodes.index(add)] = fused
        producers[add.outputs[0]] = fused  # a later norm of the same sum must not fuse again
        _remove(net, [norm])


ALL_PASSES = (fold_rope, fold_qk_norm, fuse_qkv, fuse_gate_up, fuse_add_rms_norm)
