"""Graph rewrites run by build(). Each matches a small pattern and replaces it with the fused op of
docs/engine_format.md, keeping the semantics; a pattern that does not match exactly is left alone.
Run prune() afterwards to drop the dead weights and tensors.

Layers already emit the fused forms they own (rtllm.nn: qkv and gate/up as one linear, RoPE and q/k norm
inside attention, silu_mul); what remains spans layers: a residual add and the norm of the next block, and
with tensor parallelism the all-reduce of a row-parallel output before them.
"""

import numpy as np

from .tensor import Network, Node


def _producer(net_producers: dict, name: str, op: str) -> Node | None:
    node = net_producers.get(name)
    return node if node is not None and node.op == op else None


def _remove(net: Network, nodes) -> None:
    dead = {id(n) for n in nodes}
    net.nodes = [n for n in net.nodes if id(n) not in dead]


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


def fuse_all_reduce_add_rms_norm(net: Network) -> None:
    """y = all_reduce(x); [n, s] = add_rms_norm(y, residual) -> [n, s] = all_reduce_add_rms_norm(x, residual),
    when the add_rms_norm is y's only reader (a row-parallel linear's output and the residual stream)."""
    producers, consumers = net.producers(), net.consumers()
    for norm in [n for n in net.nodes if n.op == "add_rms_norm"]:
        reduce = _producer(producers, norm.inputs[0], "all_reduce")
        if reduce is None or len(consumers.get(reduce.outputs[0], [])) != 1:
            continue
        fused = Node("all_reduce_add_rms_norm", [reduce.inputs[0], *norm.inputs[1:]], list(norm.outputs),
                     dict(norm.attrs))
        net.nodes[net.nodes.index(norm)] = fused
        _remove(net, [reduce])


# The ops that can write their first output as E4M3 codes for a static fp8_linear that reads it
# (docs/engine_format.md, "FP8 outputs").
FP8_OUTPUT_OPS = ("rms_norm", "add_rms_norm", "silu_mul")


def fuse_fp8_input_quantization(net: Network) -> None:
    """y = P(...)[0]; fp8_linear(y, ...) with static activation scaling, P in FP8_OUTPUT_OPS and the linear y's
    only reader -> P writes y as the E4M3 codes of y / input_scale (attr output_scale, y declared
    float8_e4m3) and the linear reads the codes: the activation is quantized by the kernel that produces it,
    not by one of its own. Runs after quantization, which gives the linears their calibrated input scales."""
    producers, consumers = net.producers(), net.consumers()
    for linear in [n for n in net.nodes if n.op == "fp8_linear" and n.attrs.get("activation_scaling") == "static"]:
        x = linear.inputs[0]
        producer = producers.get(x)
        if (producer is None or producer.op not in FP8_OUTPUT_OPS or producer.outputs[0] != x
                or len(consumers.get(x, [])) != 1 or x not in net.tensors):
            continue
        input_scale = net.weights[linear.inputs[3]].load()
        producer.attrs["output_scale"] = float(np.float32(input_scale.reshape(-1)[0]))
        net.tensors[x].dtype = "float8_e4m3"


# The ops whose first output is an RMSNorm of a row, with the norm's weight as their last input: where a
# quantization pass folds a per-channel scale of that output into the weight.
NORM_OPS = ("rms_norm", "add_rms_norm", "all_reduce_add_rms_norm")

ALL_PASSES = (fuse_add_rms_norm, fuse_all_reduce_add_rms_norm)
