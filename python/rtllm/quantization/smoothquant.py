"""SmoothQuant (W8A8_SQ_PER_CHANNEL): int8 weights per output channel and int8 activations per token, with
the activations' outlier channels moved into the weights first (Xiao et al., 2023).

Per group of linears reading one tensor X (q/k/v after input_layernorm, gate/up after
post_attention_layernorm: a fused linear is one), with the per-input-channel ranges calibration measured on
the unquantized model:

    s[k] = max|X[:, k]|^alpha / max|W[:, k]|^(1 - alpha)      (alpha = QuantConfig.smoothquant_val)

and X · Wᵀ = (X / s) · (W · s)ᵀ exactly. 1/s goes where X is made, so the float model is unchanged:

- into the rms_norm (or add_rms_norm) weight that produces X (q/k/v, gate/up);
- down_proj: into the up half of gate_up_proj's rows (silu(gate) · up is linear in up);
- o_proj: into v's rows of the fused qkv_proj (attention is linear in v); with grouped-query attention the
  heads of a group read one v channel, so their o_proj channels share one s (the largest ranges of the
  group). Not with a quantized KV cache, whose calibrated v scale would no longer fit;
- anywhere else (X also read by an op that is not smoothed, a weight shared with another reader): kept as
  the int8_linear's pre_quant_scale = 1/s, multiplied into x before it is quantized.

Then each linear's smoothed weight W · s is quantized to int8 per output channel (scale = amax / 127, the
same rounding as W8A16) and becomes an int8_linear (docs/engine_format.md).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..builder.passes import NORM_OPS

S_MIN, S_MAX = 1e-5, 1e5  # a smoothing factor outside this range only moves float32 rounding around


@dataclasses.dataclass
class SmoothGroup:
    """Linears reading one tensor, with one smoothing vector s over its columns, and where 1/s goes."""
    input: str            # the tensor the linears read
    linears: list         # their nodes
    fold: str             # "norm", "rows" (v_proj / up_proj rows of a producing linear) or "pre_quant_scale"
    target: str | None = None         # the norm weight, or the producing linear's weight
    target_bias: str | None = None    # that linear's bias, scaled with its rows
    rows: np.ndarray | None = None    # "rows": the producing linear's row feeding each input column
    s: np.ndarray | None = None       # float32 [K], set by smoothing_scales

    @property
    def weights(self) -> list:
        return [n.inputs[1] for n in self.linears]


def _only_reader(consumers: dict, name: str, node) -> bool:
    return [id(n) for n in consumers.get(name, [])] == [id(node)]


def smoothing_groups(network, selected: list, smooth_v: bool) -> list:
    """The selected linears grouped by the tensor they read, each with where its 1/s can fold (above).
    smooth_v False keeps o_proj's smoothing as a pre_quant_scale (a quantized KV cache)."""
    producers, consumers = network.producers(), network.consumers()
    by_input: dict = {}
    for node in selected:
        by_input.setdefault(node.inputs[0], []).append(node)
    groups = []
    for x, linears in by_input.items():
        K = network.shape_of(linears[0].inputs[1])[1]
        group = SmoothGroup(x, linears, "pre_quant_scale")
        groups.append(group)
        readers = consumers.get(x, [])
        if len(readers) != len(linears) or any(w not in network.weights for w in group.weights):
            continue  # X feeds an op that is not smoothed too
        p = producers.get(x)
        if p is None:
            continue
        if p.op in NORM_OPS and p.outputs[0] == x:
            g = p.inputs[-1]
            if g in network.weights and network.weights[g].shape == (K,) and _only_reader(consumers, g, p):
                group.fold, group.target = "norm", g
        elif p.op == "silu_mul":
            _fold_into_rows(network, producers, consumers, group, p, lambda n_rows: np.arange(K, 2 * K)
                            if n_rows == 2 * K else None)
        elif p.op == "attention" and smooth_v and p.attrs.get("fused_qkv"):
            nh, nkv, hd = p.attrs["num_heads"], p.attrs["num_kv_heads"], p.attrs["head_dim"]
            if K == nh * hd and nh % nkv == 0:
                c = np.arange(K)  # o_proj input channel (head h, dim d) reads v channel (h // (nh / nkv), d)
                v_rows = (nh + nkv) * hd + (c // hd) // (nh // nkv) * hd + c % hd
                _fold_into_rows(network, producers, consumers, group, p, lambda n_rows: v_rows
                                if n_rows == (nh + 2 * nkv) * hd else None)
    return groups


def _fold_into_rows(network, producers, consumers, group, p, rows_for):
    """group.fold "rows" when p's input comes from a linear read by p alone whose weight (and bias) nothing
    else reads and whose row count rows_for accepts."""
    lin = producers.get(p.inputs[0])
    if lin is None or lin.op != "linear" or not _only_reader(consumers, lin.outputs[0], p):
        return
    w = lin.inputs[1]
    if w not in network.weights or not _only_reader(consumers, w, lin):
        return
    bias = lin.inputs[2] if len(lin.inputs) > 2 else None
    if bias is not None and (bias not in network.weights or not _only_reader(consumers, bias, lin)):
        return
    rows = rows_for(network.weights[w].shape[0])
    if rows is None:
        return
    group.fold, group.target, group.target_bias, group.rows = "rows", w, bias, rows


def smoothing_factors(x_amax: np.ndarray, w_amax: np.ndarray, alpha: float) -> np.ndarray:
    """float32 s = x_amax^alpha / w_amax^(1 - alpha) (float64 math), clipped to [1e-5, 1e5]; 1 where either
    range is 0 (nothing to balance) or not finite."""
    x, w = np.asarray(x_amax, np.float64), np.asarray(w_amax, np.float64)
    ok = (x > 0) & (w > 0) & np.isfinite(x) & np.isfinite(w)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.where(ok, np.power(x, alpha) / np.power(w, 1.0 - alpha), 1.0)
    return np.clip(s, S_MIN, S_MAX).astype(np.float32)


def smoothing_scales(network, groups: list, channel_amax: dict, alpha: float, load_float32) -> tuple:
    """Sets each group's s and returns (row_scale, col_scale): weight name -> float32 factors its rows /
    columns are multiplied by before quantization (norm weights and biases: their only axis). Row folds
    (o_proj into v, down_proj into up) come first, so that q/k/v's and gate/up's weight ranges are those of
    the weights they will quantize. channel_amax: linear weight name -> float32 [K] input ranges."""
    row_scale: dict = {}  # weight -> [N] (1-d weights: [K]); multiplied in
    col_scale: dict = {}  # weight -> [K]
    for group in sorted(groups, key=lambda g: g.fold != "rows"):
        x_amax = channel_amax[group.weights[0]]
        w_amax = np.zeros(len(x_amax), dtype=np.float32)
        for w in group.weights:
            r = row_scale.get(w)
            a = np.abs(load_float32(w))
            if r is not None:
                a = a * r[:, None]
            w_amax = np.maximum(w_amax, a.max(axis=0))
        if group.fold == "rows" and not np.array_equal(np.unique(group.rows), np.sort(group.rows)):
            # several input channels read one producing row (GQA heads): one s per row, from the largest
            # ranges of its channels
            n_rows = network.weights[group.target].shape[0]
            xr, wr = np.zeros(n_rows, np.float32), np.zeros(n_rows, np.float32)
            np.maximum.at(xr, group.rows, x_amax)
            np.maximum.at(wr, group.rows, w_amax)
            s = smoothing_factors(xr, wr, alpha)[group.rows]
        else:
            s = smoothing_factors(x_amax, w_amax, alpha)
        group.s = s
        for w in group.weights:
            col_scale[w] = s
        inv = (np.float32(1.0) / s).astype(np.float32)
        if group.fold == "norm":
            row_scale[group.target] = inv
        elif group.fold == "rows":
            for name in (group.target, group.target_bias):
                if name is None:
                    continue
                r = row_scale.setdefault(name, np.ones(network.weights[name].shape[0], np.float32))
                r[group.rows] = inv
    return row_scale, col_scale


def scaled_parameter(weight, rows, cols):
    """weight (float) with its rows (and, 2-d, columns) multiplied by the float32 factors, as float32."""
    from ..builder.safetensors_io import to_float32
    from ..builder.tensor import Parameter

    def load():
        w = to_float32(weight.load(), weight.dtype)
        if rows is not None:
            w = w * (rows[:, None] if w.ndim == 2 else rows)
        if cols is not None:
            w = w * cols[None, :]
        return np.ascontiguousarray(w, dtype=np.float32)

    return Parameter(weight.shape, "float32", load, weight.name)


def smooth_quant(network, quant_config, calibration, report, selected: list) -> None:
    """The quantize pass for W8A8_SQ_PER_CHANNEL: smoothing (above), then each selected linear ->
    int8_linear [x, int8 codes, weight_scale [N, 1], (pre_quant_scale [K]), (bias)]. report.smoothing gets
    one entry per group (its linears, s and where 1/s went)."""
    from ..builder.safetensors_io import to_float32
    from ..builder.tensor import Parameter
    from .quantize import weight_only_int8_parameters

    for node in selected:
        shape = network.weights[node.inputs[1]].shape
        if len(shape) != 2:
            raise ValueError(f"weight {node.inputs[1]!r} {list(shape)}: SmoothQuant needs a 2-d [out_features, "
                             f"in_features] weight")
        if node.inputs[1] not in calibration.channel_amax:
            raise ValueError(f"calibration has no per-channel activation range for linear {node.inputs[1]!r}")
    smooth_v = quant_config.kv_cache_quant_algo in (None, "NO_QUANT")
    groups = smoothing_groups(network, selected, smooth_v)
    channel_amax = {}
    for group in groups:
        amax = np.asarray(calibration.channel_amax[group.weights[0]], dtype=np.float32)
        if not np.all(np.isfinite(amax)):
            raise ValueError(f"calibration saw non-finite activations at the input of {group.weights[0]!r}")
        channel_amax[group.weights[0]] = amax
    load_float32 = lambda name: to_float32(network.weights[name].load(), network.weights[name].dtype)  # noqa: E731
    row_scale, col_scale = smoothing_scales(network, groups, channel_amax, quant_config.smoothquant_val,
                                            load_float32)
    # the smoothed float weights (lazy): linears' rows and columns, norm weights, v / up rows and biases
    for name in set(row_scale) | set(col_scale):
        network.weights[name] = scaled_parameter(network.weights[name], row_scale.get(name), col_scale.get(name))
    for group in groups:
        report.smoothing.append({"linears": group.weights, "s": group.s, "fold": group.fold,
                                 "target": group.target, "rows": group.rows})
        for node in group.linears:
            name = node.inputs[1]
            report.quantized.append(name)
            codes, scale = weight_only_int8_parameters(network.weights[name])
            network.weights[codes.name] = codes
            network.weights[scale.name] = scale
            extra = []
            if group.fold == "pre_quant_scale":
                module = name.rsplit(".", 1)[0]
                inv = (np.float32(1.0) / group.s).astype(np.float32)
                pqs = Parameter(inv.shape, "float32", lambda inv=inv: inv, f"{module}.pre_quant_scale")
                pqs.keep_dtype = True
                network.weights[pqs.name] = pqs
                extra.append(pqs.name)
            node.op = "int8_linear"
            node.attrs["has_pre_quant_scale"] = bool(extra)
            node.inputs = [node.inputs[0], codes.name, scale.name, *extra, *node.inputs[2:]]
