"""A float64 numpy interpreter of an engine graph (test-only reference).

Runs whole prompts at once with no KV cache: the prompts are packed into one step (as the runtime
packs context tokens), and each attention attends causally within its own prompt. Returns the
last-token logits of every prompt. It reads the graph and weights exactly as docs/engine_format.md
states, so it checks what the builder wrote against that contract.
"""

import numpy as np

from rtllm.builder.safetensors_io import to_float32


def _rms_norm(x, w, eps):
    d = w.shape[0]
    rows = x.reshape(*x.shape[:-1], -1, d)
    out = rows / np.sqrt(np.mean(rows * rows, axis=-1, keepdims=True) + eps) * w
    return out.reshape(x.shape)


def _rope(x, positions, inv_freq, head_dim):
    # f = float32(pos) * inv_freq in float32, as the format states; cos/sin in float64
    f = (positions.astype(np.float32)[:, None] * inv_freq.astype(np.float32)[None, :]).astype(np.float64)
    cos, sin = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
    heads = x.reshape(x.shape[0], -1, head_dim)
    x1, x2 = heads[..., :head_dim // 2], heads[..., head_dim // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(x.shape)


def _attention(args, attrs, seq_lens):
    nh, nkv, hd = attrs["num_heads"], attrs["num_kv_heads"], attrs["head_dim"]
    args = list(args)
    if attrs["fused_qkv"]:
        qkv = args.pop(0)
        q, k, v = np.split(qkv, [nh * hd, (nh + nkv) * hd], axis=-1)
    else:
        q, k, v = args[:3]
        del args[:3]
    positions = inv_freq = None
    if attrs["rope"]:
        positions, inv_freq = args[:2]
        del args[:2]
    if attrs["qk_norm"]:
        q, k = _rms_norm(q, args[0], attrs["qk_norm_eps"]), _rms_norm(k, args[1], attrs["qk_norm_eps"])
    if attrs["rope"]:
        q, k = _rope(q, positions, inv_freq, hd), _rope(k, positions, inv_freq, hd)
    out = np.zeros_like(q)
    start = 0
    for n in seq_lens:
        qs = q[start:start + n].reshape(n, nh, hd)
        ks = k[start:start + n].reshape(n, nkv, hd)
        vs = v[start:start + n].reshape(n, nkv, hd)
        group = nh // nkv
        ks, vs = np.repeat(ks, group, axis=1), np.repeat(vs, group, axis=1)  # head h reads kv head h // group
        scores = np.einsum("qhd,khd->hqk", qs, ks) * attrs["scale"]
        scores = np.where(np.tril(np.ones((n, n), dtype=bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        out[start:start + n] = np.einsum("hqk,khd->qhd", probs, vs).reshape(n, nh * hd)
        start += n
    return out


def e4m3(x) -> np.ndarray:
    """float -> the nearest OCP E4M3 value (ties to even), saturated to +-448; through torch's
    float8_e4m3fn cast, which rounds to nearest even but does not saturate."""
    import torch

    clamped = np.clip(np.asarray(x, np.float32), -448.0, 448.0)
    return torch.from_numpy(clamped).to(torch.float8_e4m3fn).to(torch.float64).numpy()


def e4m3_decode(codes) -> np.ndarray:
    """E4M3 bit patterns (uint8) -> float64 values, through torch's float8_e4m3fn."""
    import torch

    return torch.from_numpy(np.array(codes, np.uint8)).view(torch.float8_e4m3fn).to(torch.float64).numpy()


def fp8_linear(x, w, weight_scale, bias=None) -> np.ndarray:
    """docs/engine_format.md's fp8_linear: per token t, s_t = max(amax|x_t| / 448, FLT_MIN) and
    q = e4m3(x_t / s_t) in float32 (as the op computes them: quantization is not continuous), then the
    product in float64. `w` holds E4M3 values (decoded)."""
    x32 = np.asarray(x, np.float32)
    s = np.maximum(np.max(np.abs(x32), axis=-1, keepdims=True) / np.float32(448.0),
                   np.finfo(np.float32).tiny).astype(np.float32)
    q = e4m3(x32 / s)
    y = (q @ np.asarray(w, np.float64).T) * s.astype(np.float64) * np.asarray(weight_scale, np.float64)
    return y + (bias if bias is not None else 0.0)


def run_graph(engine, prompts: list) -> np.ndarray:
    """[len(prompts), vocab] float64 logits of each prompt's last token."""
    seq_lens = [len(p) for p in prompts]
    values = {
        "input_ids": np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts]),
        "positions": np.concatenate([np.arange(n, dtype=np.int32) for n in seq_lens]),
        "logits_indices": (np.cumsum(seq_lens) - 1).astype(np.int32),
    }
    cache = {}

    def get(name):
        if name in values:
            return values[name]
        if name not in cache:
            w = engine.weights[name]
            cache[name] = e4m3_decode(w.load()) if w.dtype == "float8_e4m3" else \
                to_float32(w.load(), w.dtype).astype(np.float64)
        return cache[name]

    for node in engine.graph["nodes"]:
        op, attrs, args = node["op"], node["attrs"], [get(i) for i in node["inputs"]]
        if op == "embedding":
            out = [args[1][args[0]]]
        elif op == "linear":
            out = [args[0] @ args[1].T + (args[2] if len(args) == 3 else 0.0)]
        elif op == "fp8_linear":
            out = [fp8_linear(*args)]
        elif op == "rms_norm":
            out = [_rms_norm(args[0], args[1], attrs["eps"])]
        elif op == "add":
            out = [args[0] + args[1]]
        elif op == "mul":
            out = [args[0] * args[1]]
        elif op == "silu":
            out = [args[0] / (1.0 + np.exp(-args[0]))]
        elif op == "silu_mul":
            gate, up = np.split(args[0], 2, axis=-1)
            out = [gate / (1.0 + np.exp(-gate)) * up]
        elif op == "add_rms_norm":
            total = args[0] + args[1]
            out = [_rms_norm(total, args[2], attrs["eps"]), total]
        elif op == "rope":
            out = [_rope(args[0], args[1], args[2], attrs["head_dim"])]
        elif op == "attention":
            out = [_attention(args, attrs, seq_lens)]
        elif op == "gather_rows":
            out = [args[0][args[1]]]
        else:
            raise ValueError(f"unknown op {op!r}")
        values.update(zip(node["outputs"], out))
    return values["logits"]
