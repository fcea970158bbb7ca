"""AWQ (Lin et al., 2023): activation-aware weight quantization. Input channels that carry large
activations are scaled up before round-to-nearest int4 quantization, and the inverse scale is folded into
the op that produces the input, so the float function is unchanged and the salient weights lose less.

Per group of linears reading one tensor X (q/k/v fused, gate/up fused, o_proj, down_proj), with the
calibration statistics of X (rtllm.quantization.calibration.InputStats): s = mean|x|^α, or
mean|x|^α / w^(1 − α) with w a channel's mean |weight| relative to its group's largest (the form
AutoAWQ's search uses by default), clamped to 1e-4 and normalized by sqrt(max s · min s), α on the grid 0,
1/20, ..., 19/20, the candidate chosen to minimize the output error
‖X Wᵀ − X Ŵᵀ‖² = Σ (D H) ⊙ D with D = W − Q(W·diag(s))·diag(1/s) and H = XᵀX (the same objective as the
paper's, on every calibration token instead of a sample of them). α = 0 is plain round to nearest, so the
chosen scales never do worse than it on the calibration data. Q is rtllm's own W4A16 quantization
(quantize_int4_groups: the same group size, zero point and float16 scales as the engine stores).

Where s is folded (X / s must be what the producer outputs):
- rms_norm / add_rms_norm weight (q/k/v and gate/up inputs);
- the v rows of the fused qkv linear for o_proj, only when num_heads == num_kv_heads (with grouped
  query attention a v channel feeds several o_proj channels, which would need one shared scale);
- the up rows of the fused gate_up linear for down_proj (silu(gate) · up is linear in up).
A group whose producer is anything else, or whose tensor is also read by an op that is not a quantized
linear, keeps s = 1 (reported). Then the clipping search: per output row and group, the largest
magnitude is shrunk by 1, 0.95, ..., 0.55, keeping the one with the least output error of the group
(d_g H_gg d_gᵀ with the inputs scaled by 1/s), except on the q and k rows whose errors go through the
softmax (as AutoAWQ does). The result is float weights that the ordinary W4A16 pass quantizes.
"""
import numpy as np

from ..builder.passes import NORM_OPS

GRID = 20
CLIP_GRID = 20
MAX_SHRINK = 0.5


def _producers(network) -> dict:
    return {out: node for node in network.nodes for out in node.outputs}


def _fake_quant(w: np.ndarray, group_size: int, has_zero_point: bool) -> np.ndarray:
    """The float32 weights rtllm's W4A16 quantization reproduces for w."""
    from .quantize import quantize_int4_groups

    codes, scale, offset = quantize_int4_groups(np.ascontiguousarray(w, np.float32), group_size, has_zero_point)
    r = np.repeat(scale.astype(np.float32), group_size, axis=1) * codes.astype(np.float32)
    if offset is not None:
        r += np.repeat(offset, group_size, axis=1)
    return r


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """‖X wᵀ − X ŵᵀ‖² = Σ (D H) ⊙ D for H = XᵀX."""
    d = (w - w_hat).astype(np.float32)
    return float(np.sum((d @ h.astype(np.float32)) * d, dtype=np.float64))


def weight_means(w: np.ndarray, group_size: int) -> np.ndarray:
    """Per input channel, the mean over output rows of |w| relative to its group's largest |w| ([K])."""
    N, K = w.shape
    g = np.abs(w.astype(np.float64)).reshape(N, K // group_size, group_size)
    return (g / (g.max(axis=2, keepdims=True) + 1e-6)).reshape(N, K).mean(axis=0)


def search_scale(w: np.ndarray, mean_abs: np.ndarray, h: np.ndarray, group_size: int, has_zero_point: bool) -> tuple:
    """(s [K] float32, label of the chosen candidate, error, error at α = 0) for the weights w [N, K] of a
    group reading X. Two families of candidates, α on the grid: s = x^α, and s = x^α / w^(1 − α) with w
    the channel's weight_means (large activations and small relative weights both ask for a larger s)."""
    x = np.maximum(mean_abs.astype(np.float64), 0.0)
    wm = weight_means(w, group_size)
    best = None
    base = None
    for duo in (False, True):
        for i in range(GRID):
            alpha = i / GRID
            s = x ** alpha
            if duo:
                s = s / (wm ** (1 - alpha) + 1e-4)
            s = np.maximum(s, 1e-4)
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)
            err = output_error(w, _fake_quant(w * s, group_size, has_zero_point) / s, h)
            if base is None:
                base = err
            if best is None or err < best[2]:
                best = (s, f"alpha {alpha:.2f}" + (" over weight means" if duo else ""), err)
    return (*best, base)


def search_clip(w: np.ndarray, h: np.ndarray, group_size: int, has_zero_point: bool,
                skip_rows: int = 0) -> np.ndarray:
    """Per row and group, the bound [N, K / G] to clamp w to (its amax when no shrink helps)."""
    N, K = w.shape
    ng = K // group_size
    g = w.reshape(N, ng, group_size)
    amax = np.abs(g).max(axis=2)
    blocks = np.stack([h[i * group_size:(i + 1) * group_size, i * group_size:(i + 1) * group_size]
                       for i in range(ng)]).astype(np.float32)
    best_err = np.full((N, ng), np.inf)
    best = amax.copy()
    for i in range(int(MAX_SHRINK * CLIP_GRID)):
        bound = amax * (1 - i / CLIP_GRID)
        wc = np.clip(g, -bound[..., None], bound[..., None]).reshape(N, K)
        d = (w - _fake_quant(wc, group_size, has_zero_point)).reshape(N, ng, group_size).astype(np.float32)
        dg = d.transpose(1, 0, 2)  # [ng, N, G]: one batched product per group
        err = np.sum(np.matmul(dg, blocks) * dg, axis=2).T
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, bound, best)
    best[:skip_rows] = amax[:skip_rows]
    return best.astype(np.float32)


class _Transform:
    """Lazy float32 weight: w · cols (per input channel) / rows (per output row), clamped per group."""

    def __init__(self, weight):
        self.weight = weight
        self.cols = None
        self.rows = np.ones(weight.shape[0], np.float32)
        self.clip = None
        self.group_size = None

    def __call__(self):
        from .quantize import _float32

        w = _float32(self.weight)
        if self.cols is not None:
            w = w * self.cols[None, :]
        w = w / self.rows[:, None]
        if self.clip is not None:
            b = np.repeat(self.clip, self.group_size, axis=1)
            w = np.clip(w, -b, b)
        return np.ascontiguousarray(w, np.float32)


def apply_awq(network, selected: list, quant_config, calibration, report) -> None:
    """Rewrites network.weights: each selected linear's weight becomes its scaled (and clipped) float32
    weight, the producers' weights take 1 / s. Reads the weights (the search needs them)."""
    from ..builder.tensor import Parameter
    from .quantize import _float32

    G, zp = quant_config.group_size, quant_config.has_zero_point
    producers = _producers(network)
    consumers = network.consumers()
    by_input = {}
    for node in selected:
        by_input.setdefault(node.inputs[0], []).append(node)
    transforms = {node.inputs[1]: _Transform(network.weights[node.inputs[1]]) for node in selected}
    selected_ids = {id(n) for n in selected}
    norm_scales = {}  # norm weight name -> s to divide by
    report.awq = {}
    for tensor, nodes in by_input.items():
        names = [n.inputs[1] for n in nodes]
        stats = [calibration.input_stats.get(name) for name in names]
        if any(s is None for s in stats):
            raise ValueError(f"calibration has no input statistics for {names}")
        readers = consumers.get(tensor, [])
        target = _fold_target(network, producers.get(tensor), tensor, transforms)
        if target is None or any(id(r) not in selected_ids for r in readers):
            report.awq[names[0]] = "kept s = 1 (the producer cannot take the scale)"
            continue
        w = np.concatenate([_float32(network.weights[name]) for name in names], axis=0)
        s, label, err, base = search_scale(w, stats[0].mean_abs, stats[0].xtx / max(stats[0].rows, 1), G, zp)
        report.awq[names[0]] = f"{label}: output error {err:.4g} (round to nearest {base:.4g})"
        for name in names:
            transforms[name].cols = s
        kind, name, rows = target
        if kind == "norm":
            norm_scales[name] = s
        else:
            t = transforms.get(name)
            if t is None:  # an unquantized producer linear: its float rows take 1 / s
                t = transforms[name] = _Transform(network.weights[name])
            t.rows[rows] = t.rows[rows] * s
            bias = _bias_of(network, name)
            if bias is not None:
                norm_scales[bias] = np.concatenate([np.ones(rows.start), s,
                                                    np.ones(t.rows.shape[0] - rows.stop)]).astype(np.float32)
    # the clipping search, on the scaled weights with the inputs scaled by 1 / s
    for node in selected:
        name = node.inputs[1]
        t = transforms[name]
        st = calibration.input_stats[name]
        h = st.xtx / max(st.rows, 1)
        if t.cols is not None:
            h = h / np.outer(t.cols, t.cols)
        skip = 0
        for reader in consumers.get(node.outputs[0], []):
            if reader.op == "attention" and reader.attrs.get("fused_qkv"):
                a = reader.attrs
                skip = (a["num_heads"] + a["num_kv_heads"]) * a["head_dim"]
        t.clip, t.group_size = search_clip(t(), h, G, zp, skip), G
    for name, t in transforms.items():
        old = network.weights[name]
        network.weights[name] = Parameter(old.shape, "float32", t, name)
    for name, s in norm_scales.items():
        old = network.weights[name]
        network.weights[name] = Parameter(old.shape, "float32",
                                          lambda old=old, s=s: (_float32(old) / s).astype(np.float32), name)


def _bias_of(network, weight_name: str):
    for node in network.nodes:
        if node.op == "linear" and node.inputs[1] == weight_name and len(node.inputs) > 2:
            return node.inputs[2]
    return None


def _fold_target(network, producer, tensor: str, transforms: dict):
    """("norm", weight name, None) or ("rows", linear weight name, slice of its rows) that X's scale folds
    into, or None."""
    if producer is None:
        return None
    if producer.op in NORM_OPS and producer.outputs[0] == tensor:
        return "norm", producer.inputs[-1], None
    producers = _producers(network)
    if producer.op == "silu_mul":
        up = producers.get(producer.inputs[0])
        if up is not None and up.op == "linear" and len(network.consumers()[producer.inputs[0]]) == 1:
            n = network.weights[up.inputs[1]].shape[0]
            return "rows", up.inputs[1], slice(n // 2, n)
    if producer.op == "attention":
        a = producer.attrs
        qkv = producers.get(producer.inputs[0])
        if a.get("fused_qkv") and a["num_heads"] == a["num_kv_heads"] and qkv is not None and qkv.op == "linear":
            hd, nh = a["head_dim"], a["num_heads"]
            return "rows", qkv.inputs[1], slice(2 * nh * hd, 3 * nh * hd)
    return None
