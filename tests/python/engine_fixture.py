"""Hand-written engines for runtime tests: a tiny Llama-style graph (config.json + rank0.engine) with
random weights, and a float64 numpy transformer that computes the same model over whole sequences.

The graph is written here by hand from docs/engine_format.md (not by rtllm's builder), so runtime tests
do not depend on the builder. `fused=True` uses fused qkv / gate_up weights, add_rms_norm, silu_mul and
RoPE + qk_norm inside attention; `fused=False` uses separate linears and the standalone rope, rms_norm,
add, silu and mul ops. Both describe the same model.
"""
import json
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TinyModel:
    vocab_size: int = 96
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 80
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # weight dtype in the engine file: float32, float16 or bfloat16
    seed: int = 0
    weights: dict = field(default_factory=dict)  # HF names -> float64 arrays (after dtype rounding)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        H, hd, I = self.hidden_size, self.head_dim, self.intermediate_size
        nh, nkv = self.num_heads, self.num_kv_heads

        def mat(rows, cols):
            return rng.standard_normal((rows, cols)) / np.sqrt(cols)

        def norm(n):
            return 1.0 + 0.1 * rng.standard_normal(n)

        w = {"model.embed_tokens.weight": rng.standard_normal((self.vocab_size, H))}
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            w[p + "input_layernorm.weight"] = norm(H)
            w[p + "self_attn.q_proj.weight"] = mat(nh * hd, H)
            w[p + "self_attn.k_proj.weight"] = mat(nkv * hd, H)
            w[p + "self_attn.v_proj.weight"] = mat(nkv * hd, H)
            if self.qkv_bias:
                w[p + "self_attn.q_proj.bias"] = 0.1 * rng.standard_normal(nh * hd)
                w[p + "self_attn.k_proj.bias"] = 0.1 * rng.standard_normal(nkv * hd)
                w[p + "self_attn.v_proj.bias"] = 0.1 * rng.standard_normal(nkv * hd)
            if self.qk_norm:
                w[p + "self_attn.q_norm.weight"] = norm(hd)
                w[p + "self_attn.k_norm.weight"] = norm(hd)
            w[p + "self_attn.o_proj.weight"] = mat(H, nh * hd)
            w[p + "post_attention_layernorm.weight"] = norm(H)
            w[p + "mlp.gate_proj.weight"] = mat(I, H)
            w[p + "mlp.up_proj.weight"] = mat(I, H)
            w[p + "mlp.down_proj.weight"] = mat(H, I)
        w["model.norm.weight"] = norm(H)
        if not self.tie_word_embeddings:
            w["lm_head.weight"] = mat(self.vocab_size, H)
        # The reference uses exactly the values the engine stores.
        self.weights = {k: _round_to(v, self.dtype) for k, v in w.items()}
        self.inv_freq = (1.0 / self.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)).astype(np.float32)


def _round_to(x, dtype):
    if dtype == "float32":
        return x.astype(np.float32).astype(np.float64)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float64)
    if dtype == "bfloat16":
        return bf16_bits_to_float(float_to_bf16_bits(x)).astype(np.float64)
    raise ValueError(dtype)


def float_to_bf16_bits(x):
    """float -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def bf16_bits_to_float(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- engine writing


def write_safetensors(path, tensors):
    """tensors: name -> (safetensors dtype, shape, raw bytes). Written in the safetensors layout."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def _stored(x, dtype):
    if dtype == "float32":
        return "F32", x.shape, x.astype(np.float32).tobytes()
    if dtype == "float16":
        return "F16", x.shape, x.astype(np.float16).tobytes()
    return "BF16", x.shape, float_to_bf16_bits(x).tobytes()


class _GraphWriter:
    def __init__(self):
        self.nodes, self.tensors = [], []

    def node(self, op, inputs, cols, attrs=None, rows="num_tokens", num_outputs=1):
        names = [f"t{len(self.tensors) + i}" for i in range(num_outputs)]
        for n in names:
            self.tensors.append({"name": n, "dtype": "float32", "shape": [rows, cols]})
        self.nodes.append({"op": op, "inputs": list(inputs), "outputs": names, "attrs": attrs or {}})
        return names[0] if num_outputs == 1 else names


def engine_config(model_config, limits, tensors, nodes, fused=True, format_version=1):
    """config.json of a hand-written engine (docs/engine_format.md) whose graph ends in "logits"."""
    def spec(name, *shape):
        return {"name": name, "dtype": "int32" if name != "logits" else "float32", "shape": list(shape)}

    return {
        "format_version": format_version, "rtllm_version": "0.1.0",
        "architecture": model_config["architecture"], "model_config": model_config,
        "build_config": {**limits, "fuse": fused}, "quantization": {"quant_algo": None},
        "mapping": {"tp_size": 1, "tp_rank": 0},
        "graph": {
            "inputs": [spec("input_ids", "num_tokens"), spec("positions", "num_tokens"),
                       spec("last_token_ids", "num_seqs")],
            "outputs": [spec("logits", "num_seqs", model_config["vocab_size"])],
            "tensors": tensors, "nodes": nodes,
        },
    }


def write_engine(path, m: TinyModel, fused=True, limits=None, format_version=1):
    """Writes config.json and rank0.engine for model m into directory `path`."""
    H, hd, I, nh, nkv = m.hidden_size, m.head_dim, m.intermediate_size, m.num_heads, m.num_kv_heads
    eps = m.rms_norm_eps
    weights = dict(m.weights)
    g = _GraphWriter()
    h = g.node("embedding", ["input_ids", "model.embed_tokens.weight"], H)
    residual = None
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        attn = {"layer_idx": i, "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd, "scale": hd ** -0.5,
                "fused_qkv": fused, "rope": fused, "qk_norm": fused and m.qk_norm}
        if fused and m.qk_norm:
            attn["qk_norm_eps"] = eps
        if fused:
            if residual is None:
                x, residual = g.node("rms_norm", [h, p + "input_layernorm.weight"], H, {"eps": eps}), h
            parts = ["q_proj", "k_proj", "v_proj"]
            weights[p + "self_attn.qkv_proj.weight"] = np.concatenate(
                [weights.pop(p + f"self_attn.{n}.weight") for n in parts])
            qkv_in = [x, p + "self_attn.qkv_proj.weight"]
            if m.qkv_bias:
                weights[p + "self_attn.qkv_proj.bias"] = np.concatenate(
                    [weights.pop(p + f"self_attn.{n}.bias") for n in parts])
                qkv_in.append(p + "self_attn.qkv_proj.bias")
            qkv = g.node("linear", qkv_in, (nh + 2 * nkv) * hd)
            ins = [qkv, "positions", "rope.inv_freq"]
            if m.qk_norm:
                ins += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
            a = g.node("attention", ins, nh * hd, attn)
            o = g.node("linear", [a, p + "self_attn.o_proj.weight"], H)
            x, residual = g.node("add_rms_norm", [o, residual, p + "post_attention_layernorm.weight"], H,
                                 {"eps": eps}, num_outputs=2)
            weights[p + "mlp.gate_up_proj.weight"] = np.concatenate(
                [weights.pop(p + "mlp.gate_proj.weight"), weights.pop(p + "mlp.up_proj.weight")])
            gu = g.node("linear", [x, p + "mlp.gate_up_proj.weight"], 2 * I)
            act = g.node("silu_mul", [gu], I)
            d = g.node("linear", [act, p + "mlp.down_proj.weight"], H)
            if i + 1 < m.num_layers:
                x, residual = g.node("add_rms_norm", [d, residual, f"model.layers.{i + 1}.input_layernorm.weight"],
                                     H, {"eps": eps}, num_outputs=2)
            else:
                h = g.node("add", [d, residual], H)
        else:
            x = g.node("rms_norm", [h, p + "input_layernorm.weight"], H, {"eps": eps})
            qkv = []
            for n, cols in (("q_proj", nh * hd), ("k_proj", nkv * hd), ("v_proj", nkv * hd)):
                ins = [x, p + f"self_attn.{n}.weight"] + ([p + f"self_attn.{n}.bias"] if m.qkv_bias else [])
                qkv.append(g.node("linear", ins, cols))
            q, k, v = qkv
            if m.qk_norm:
                q = g.node("rms_norm", [q, p + "self_attn.q_norm.weight"], nh * hd, {"eps": eps})
                k = g.node("rms_norm", [k, p + "self_attn.k_norm.weight"], nkv * hd, {"eps": eps})
            q = g.node("rope", [q, "positions", "rope.inv_freq"], nh * hd, {"head_dim": hd})
            k = g.node("rope", [k, "positions", "rope.inv_freq"], nkv * hd, {"head_dim": hd})
            a = g.node("attention", [q, k, v], nh * hd, attn)
            o = g.node("linear", [a, p + "self_attn.o_proj.weight"], H)
            h = g.node("add", [h, o], H)
            x = g.node("rms_norm", [h, p + "post_attention_layernorm.weight"], H, {"eps": eps})
            gate = g.node("linear", [x, p + "mlp.gate_proj.weight"], I)
            up = g.node("linear", [x, p + "mlp.up_proj.weight"], I)
            act = g.node("mul", [g.node("silu", [gate], I), up], I)
            d = g.node("linear", [act, p + "mlp.down_proj.weight"], H)
            h = g.node("add", [h, d], H)
    last = g.node("gather_rows", [h, "last_token_ids"], H, rows="num_seqs")
    normed = g.node("rms_norm", [last, "model.norm.weight"], H, {"eps": eps}, rows="num_seqs")
    head = "model.embed_tokens.weight" if m.tie_word_embeddings else "lm_head.weight"
    logits = g.node("linear", [normed, head], m.vocab_size, rows="num_seqs")
    g.tensors[-1]["name"] = g.nodes[-1]["outputs"][0] = "logits"

    limits = {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 320, "max_num_tokens": 512,
              **(limits or {})}
    model_config = {
        "architecture": "LlamaForCausalLM", "vocab_size": m.vocab_size, "hidden_size": H,
        "num_layers": m.num_layers, "num_heads": nh, "num_kv_heads": nkv, "head_dim": hd,
        "intermediate_size": I, "max_position_embeddings": 4096, "rms_norm_eps": eps,
        "rope_theta": m.rope_theta, "rope_scaling": None, "tie_word_embeddings": m.tie_word_embeddings,
        "attention_bias": m.qkv_bias, "qk_norm": m.qk_norm, "dtype": m.dtype, "bos_token_id": 1,
        "eos_token_id": [2],
    }
    config = engine_config(model_config, limits, g.tensors, g.nodes, fused=fused,
                           format_version=format_version)
    assert logits == "t%d" % (len(g.tensors) - 1)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    stored = {name: _stored(x, m.dtype) for name, x in weights.items()}
    stored["rope.inv_freq"] = ("F32", m.inv_freq.shape, m.inv_freq.tobytes())
    write_safetensors(path / "rank0.engine", stored)
    return path


class RunnerSession:
    """A runner (any device: pass device= in **runtime) plus a block allocator that hands out blocks in
    shuffled order, and each sequence's tokens."""

    def __init__(self, engine_dir, tokens_per_block=4, num_kv_blocks=256, seed=0, **runtime):
        from rtllm import _core

        self.engine = _core.Engine.load(str(engine_dir))
        cfg = _core.RuntimeConfig(tokens_per_block=tokens_per_block, num_kv_blocks=num_kv_blocks, **runtime)
        self.runner = _core.ModelRunner(self.engine, cfg)
        self.tpb = tokens_per_block
        self.free = list(np.random.default_rng(seed).permutation(num_kv_blocks))
        self.blocks = {}  # seq -> block ids
        self.tokens = {}  # seq -> tokens whose K/V are cached

    def step(self, new_tokens):
        """new_tokens: {seq: list of tokens}, context sequences first. Returns {seq: logits}."""
        seqs = list(new_tokens)
        for s in seqs:
            cached = len(self.tokens.setdefault(s, []))
            needed = -(-(cached + len(new_tokens[s])) // self.tpb)
            blocks = self.blocks.setdefault(s, [])
            while len(blocks) < needed:
                blocks.append(self.free.pop())
        width = max(len(self.blocks[s]) for s in seqs) + 1  # one spare column of -1
        table = np.full((len(seqs), width), -1, dtype=np.int32)
        for i, s in enumerate(seqs):
            table[i, :len(self.blocks[s])] = self.blocks[s]
        ids = [t for s in seqs for t in new_tokens[s]]
        logits = self.runner.forward(ids, [len(new_tokens[s]) for s in seqs],
                                     [len(self.tokens[s]) for s in seqs], table)
        assert logits.shape == (len(seqs), self.engine.vocab_size) and logits.dtype == np.float32
        for s in seqs:
            self.tokens[s] = self.tokens[s] + list(new_tokens[s])
        return dict(zip(seqs, logits))


def random_tokens(rng, m, n):
    return [int(t) for t in rng.integers(0, m.vocab_size, n)]


# ---------------------------------------------------------------- float64 reference


def _rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, inv_freq):
    """x [T, heads, hd]; the angle is float32(pos) * inv_freq rounded to float32, as the format states."""
    f = (positions.astype(np.float32)[:, None] * inv_freq[None, :]).astype(np.float64)
    cos, sin = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def reference_logits(m: TinyModel, tokens, kv_round=None):
    """Logits [len(tokens), vocab] of a causal transformer over the whole sequence, in float64.
    kv_round: applied to K (after qk_norm and RoPE) and V as a KV cache stores them (e.g. E4M3 rounding)."""
    w, eps = m.weights, m.rms_norm_eps
    nh, nkv, hd = m.num_heads, m.num_kv_heads, m.head_dim
    T = len(tokens)
    pos = np.arange(T)
    h = w["model.embed_tokens.weight"][np.asarray(tokens)]
    mask = np.tril(np.ones((T, T), dtype=bool))
    for i in range(m.num_layers):
        p = f"model.layers.{i}."

        def proj(x, name):
            y = x @ w[p + name + ".weight"].T
            return y + w[p + name + ".bias"] if m.qkv_bias and name.startswith("self_attn.") and \
                name != "self_attn.o_proj" else y

        x = _rms_norm(h, w[p + "input_layernorm.weight"], eps)
        q = proj(x, "self_attn.q_proj").reshape(T, nh, hd)
        k = proj(x, "self_attn.k_proj").reshape(T, nkv, hd)
        v = proj(x, "self_attn.v_proj").reshape(T, nkv, hd)
        if m.qk_norm:
            q = _rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k = _rope(q, pos, m.inv_freq), _rope(k, pos, m.inv_freq)
        if kv_round is not None:
            k, v = kv_round(k), kv_round(v)
        group = nh // nkv
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # [T, nh, hd]
        scores = np.einsum("thd,shd->hts", q, k) * hd ** -0.5
        scores = np.where(mask[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = np.einsum("hts,shd->thd", probs, v).reshape(T, nh * hd)
        h = h + attn @ w[p + "self_attn.o_proj.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = x @ w[p + "mlp.gate_proj.weight"].T, x @ w[p + "mlp.up_proj.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    h = _rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if m.tie_word_embeddings else w["lm_head.weight"]
    return h @ head.T


def build_engine_dirs(checkpoint, tmp_path_factory, variants):
    """Engines of one HF checkpoint built by rtllm.build, one per (name, QuantConfig or None) in
    `variants`; returns their directories in that order."""
    from rtllm.builder import BuildConfig, build
    from rtllm.models import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_hugging_face(checkpoint)
    dirs = []
    for name, quant in variants:
        path = tmp_path_factory.mktemp(name)
        build(model, BuildConfig(max_seq_len=128), quant).save(path)
        dirs.append(path)
    return dirs


def write_one_op_engine(path, llama_dir, x_rows, num_outputs, op, inputs, weights, attrs, quant_config=None,
                        **limits):
    """An engine whose graph is embedding -> `op` -> gather_rows, so that token i's activation is x_rows[i]
    (the embedding table) and each single-token sequence feeds one chosen row to the op. The op's inputs
    are the activation, then `inputs` (names of `weights`: {name: Parameter}); it has num_outputs columns.
    The rest of the config is that of the model in llama_dir built with quant_config and `limits`."""
    from rtllm.builder import BuildConfig, Engine, build
    from rtllm.builder.tensor import Parameter
    from rtllm.models import AutoModelForCausalLM

    num_rows, hidden = x_rows.shape
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)  # its config, with the graph replaced
    config = build(model, BuildConfig(**{"max_seq_len": 128, **limits}), quant_config).config
    config["model_config"].update(vocab_size=num_outputs, hidden_size=hidden)
    weights = {"table": Parameter((num_rows, hidden), "float32", lambda: x_rows, "table"), **weights}
    spec = lambda name, *shape: {"name": name, "dtype": "float32", "shape": list(shape)}  # noqa: E731
    graph = config["graph"]
    graph["tensors"] = [spec("t0", "num_tokens", hidden), spec("t1", "num_tokens", num_outputs)]
    graph["outputs"] = [spec("logits", "num_logits", num_outputs)]
    graph["nodes"] = [
        {"op": "embedding", "inputs": ["input_ids", "table"], "outputs": ["t0"], "attrs": {}},
        {"op": op, "inputs": ["t0", *inputs], "outputs": ["t1"], "attrs": attrs},
        {"op": "gather_rows", "inputs": ["t1", "logits_indices"], "outputs": ["logits"], "attrs": {}},
    ]
    Engine(config, weights).save(path)


def assert_prefix_reuse_reproduces(engine_dir):
    """A request run alone and the same request sharing a cached 43-token prefix (5 full blocks of 8
    shared, 3 tokens of the sixth copied) give the same tokens and the same logprobs: the reused K/V are
    the bytes the request would have written itself (whatever the pool's element type)."""
    from hf_reference import random_prompts
    from rtllm import LLM, KvCacheConfig, SamplingParams

    rng = np.random.default_rng(7)
    system = random_prompts(rng, [43])[0]
    first, second = (system + tail for tail in random_prompts(rng, [6, 11]))
    params = SamplingParams(max_tokens=6, logprobs=1, temperature=0.0, ignore_eos=True)
    kv = KvCacheConfig(max_tokens=1024, tokens_per_block=8)

    def run(llm, prompt):
        o = llm.generate(prompt, params, use_tqdm=False).outputs[0]
        return o.token_ids, [lp[t] for lp, t in zip(o.logprobs, o.token_ids)]

    with LLM(str(engine_dir), kv_cache_config=kv) as llm:
        alone = run(llm, second)
    with LLM(str(engine_dir), kv_cache_config=kv) as llm:
        run(llm, first)
        before = llm.get_stats()["kv_cache"]
        shared = run(llm, second)
        after = llm.get_stats()["kv_cache"]
    assert after["num_reused_tokens"] - before["num_reused_tokens"] == 43
    assert after["num_partial_reused_blocks"] - before["num_partial_reused_blocks"] == 1
    assert shared == alone
