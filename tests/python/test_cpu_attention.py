"""The CPU attention op, through a two-attention engine (embedding -> attention -> linear -> attention ->
gather_rows: every token's first-layer output reaches the last token's output), against float64 numpy: fused q/k/v rows with RoPE (and qk_norm), GQA, paged KV over several steps, and results
that do not depend on the other sequences of a step or on the thread count."""
import json

import numpy as np
import pytest

from engine_fixture import engine_config, write_safetensors
from rtllm import _core


def write_attention_engine(path, num_heads, num_kv_heads, head_dim, qk_norm=False, max_num_tokens=256,
                           max_seq_len=320, num_layers=2, seed=0):
    """Token id i embeds to row i of a random [vocab, (nh + 2 nkv) hd] table: the fused qkv of that token.
    Layer l > 0 gets its qkv from linear(W<l>) of the previous attention output. The output (vocab =
    nh hd columns) is each sequence's last attention row of the last layer. Returns the weights."""
    nh, nkv, hd = num_heads, num_kv_heads, head_dim
    vocab, width = nh * hd, (nh + 2 * nkv) * hd
    rng = np.random.default_rng(seed)
    w = {"E": rng.standard_normal((vocab, width)).astype(np.float32),
         "rope.inv_freq": (1.0 / 10000.0 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)}
    norm_ins = []
    if qk_norm:
        w["qn"] = (1.0 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        w["kn"] = (1.0 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
        norm_ins = ["qn", "kn"]
    nodes = [{"op": "embedding", "inputs": ["input_ids", "E"], "outputs": ["qkv0"], "attrs": {}}]
    tensors = [{"name": "qkv0", "dtype": "float32", "shape": ["num_tokens", width]}]
    for l in range(num_layers):
        if l > 0:
            w[f"W{l}"] = (rng.standard_normal((width, vocab)) * 2.0 / np.sqrt(vocab)).astype(np.float32)
            nodes.append({"op": "linear", "inputs": [f"a{l - 1}", f"W{l}"], "outputs": [f"qkv{l}"], "attrs": {}})
            tensors.append({"name": f"qkv{l}", "dtype": "float32", "shape": ["num_tokens", width]})
        attrs = {"layer_idx": l, "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "scale": hd ** -0.5,
                 "fused_qkv": True, "rope": True, "qk_norm": qk_norm, "qk_norm_eps": 1e-6}
        nodes.append({"op": "attention", "inputs": [f"qkv{l}", "positions", "rope.inv_freq"] + norm_ins,
                      "outputs": [f"a{l}"], "attrs": attrs})
        tensors.append({"name": f"a{l}", "dtype": "float32", "shape": ["num_tokens", vocab]})
    nodes.append({"op": "gather_rows", "inputs": [f"a{num_layers - 1}", "last_token_ids"], "outputs": ["logits"],
                  "attrs": {}})
    tensors.append({"name": "logits", "dtype": "float32", "shape": ["num_seqs", vocab]})
    limits = {"max_batch_size": 64, "max_input_len": max_seq_len, "max_seq_len": max_seq_len,
              "max_num_tokens": max_num_tokens}
    model_config = {
        "architecture": "LlamaForCausalLM", "vocab_size": vocab, "hidden_size": vocab, "num_layers": num_layers,
        "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "intermediate_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "attention_bias": False, "qk_norm": qk_norm, "dtype": "float32",
        "bos_token_id": 1, "eos_token_id": [2]}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(engine_config(model_config, limits, tensors, nodes)))
    write_safetensors(path / "rank0.engine", {k: ("F32", v.shape, v.tobytes()) for k, v in w.items()})
    return w


def reference_attention(w, qkv, nh, nkv, hd, qk_norm):
    """float64 causal attention rows [T, nh hd] of a sequence that starts at position 0."""
    T = len(qkv)
    q = qkv[:, :nh * hd].reshape(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].reshape(T, nkv, hd)
    if qk_norm:
        q = q / np.sqrt(np.mean(q * q, -1, keepdims=True) + 1e-6) * w["qn"]
        k = k / np.sqrt(np.mean(k * k, -1, keepdims=True) + 1e-6) * w["kn"]
    f = (np.arange(T, dtype=np.float32)[:, None] * w["rope.inv_freq"][None]).astype(np.float64)
    cos, sin = np.cos(f)[:, None], np.sin(f)[:, None]

    def rope(x):
        x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    q, k = rope(q), rope(k)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) * hd ** -0.5
    s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, nh * hd)


def reference_last_row(w, tokens, nh, nkv, hd, qk_norm, num_layers=2):
    qkv = w["E"][np.asarray(tokens)].astype(np.float64)
    for l in range(num_layers):
        if l > 0:
            qkv = a @ w[f"W{l}"].astype(np.float64).T
        a = reference_attention(w, qkv, nh, nkv, hd, qk_norm)
    return a[-1]


class Runner:
    """Sequences in fixed, shuffled blocks of a tokens_per_block pool; step() returns last rows."""

    def __init__(self, path, tokens_per_block=4, num_threads=1, num_seqs=8, max_seq_len=320):
        cfg = _core.RuntimeConfig(tokens_per_block=tokens_per_block, num_kv_blocks=num_seqs * 90 + 1,
                                  num_threads=num_threads)
        self.runner = _core.ModelRunner(_core.Engine.load(str(path)), cfg)
        blocks_per_seq = -(-max_seq_len // tokens_per_block)
        perm = np.random.default_rng(1).permutation(num_seqs * 90)[:num_seqs * blocks_per_seq]
        self.table = perm.reshape(num_seqs, blocks_per_seq).astype(np.int32)

    def step(self, seqs, new_tokens, num_cached):
        ids = [t for toks in new_tokens for t in toks]
        return self.runner.forward(ids, [len(t) for t in new_tokens], list(num_cached), self.table[list(seqs)])


@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 16), (8, 4, 64), (6, 6, 32), (4, 1, 20), (2, 1, 128), (20, 1, 8)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_float64_and_is_batch_invariant(tmp_path, nh, nkv, hd, qk_norm):
    w = write_attention_engine(tmp_path / "e", nh, nkv, hd, qk_norm)
    rng = np.random.default_rng(0)
    lengths = [1, 7, 33, 70, 129]
    seqs = [[int(t) for t in rng.integers(0, nh * hd, n)] for n in lengths]
    together = Runner(tmp_path / "e", num_threads=2, num_seqs=len(seqs))
    out = together.step(range(len(seqs)), seqs, [0] * len(seqs))
    for i, toks in enumerate(seqs):
        ref = reference_last_row(w, toks, nh, nkv, hd, qk_norm)
        err = np.max(np.abs(out[i] - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, f"sequence {i} ({len(toks)} tokens): relative error {err:.3g}"
    # one sequence at a time, one thread, prefill in chunks of 5 then decode: the same bits
    alone = Runner(tmp_path / "e", num_threads=1, num_seqs=len(seqs))
    for i, toks in enumerate(seqs):
        cut = max(len(toks) - 1, 0)
        for start in range(0, cut, 5):
            alone.step([i], [toks[start:min(start + 5, cut)]], [start])
        last = alone.step([i], [toks[cut:]], [cut])[0]
        np.testing.assert_array_equal(last, out[i])


def test_large_scores_stay_finite(tmp_path):
    """Scores of ±1e3 (rows scaled up): the softmax must subtract the max, not overflow."""
    w = write_attention_engine(tmp_path / "e", 2, 1, 16)
    w["E"] *= 30.0
    write_safetensors(tmp_path / "e" / "rank0.engine", {k: ("F32", v.shape, v.tobytes()) for k, v in w.items()})
    toks = [int(t) for t in np.random.default_rng(2).integers(0, 32, 50)]
    out = Runner(tmp_path / "e", num_seqs=1).step([0], [toks], [0])[0]
    ref = reference_last_row(w, toks, 2, 1, 16, False)
    assert np.all(np.isfinite(out))
    assert np.max(np.abs(out - ref)) / np.max(np.abs(ref)) < 1e-4
