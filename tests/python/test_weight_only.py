"""Weight-only integer quantization (W8A16, W4A16 round to nearest) on the CPU: the quantize pass against an
independent numpy statement of its formulas, the CPU weight_only_linear op against a float64 reference of
its semantics (docs/engine_format.md), whole quantized models against HF transformers running the
dequantized weights, the engine round trip, batch invariance and the refusals."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine_fixture import RunnerSession, write_one_op_engine
from hf_reference import STACKED_PROJECTIONS, hf_greedy, hf_last_logits, load_hf_model, random_prompts, relative_error
from rtllm import LLM, RtllmError, SamplingParams, _core
from rtllm.builder import BuildConfig, Engine, build
from rtllm.builder.safetensors_io import float32_to_bf16, pack_int4, unpack_int4
from rtllm.builder.tensor import Parameter
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantAlgo, QuantConfig
from rtllm.quantization.quantize import quantize_int4_groups, quantize_int8_rows

W8 = QuantConfig(quant_algo=QuantAlgo.W8A16)
W4_G32 = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=32)
W4_G64_ZP = QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=64, has_zero_point=True)
VARIANTS = {"w8": W8, "w4g32": W4_G32, "w4g64zp": W4_G64_ZP}


# ---------------------------------------------------------------- the quantize pass's formulas

def test_int8_rows():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 40)).astype(np.float32)
    w[2] = 0.0
    w[4] *= 1e30
    codes, scale = quantize_int8_rows(w)
    assert codes.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (6, 1)
    amax = np.abs(w).max(axis=1, keepdims=True)
    np.testing.assert_array_equal(scale, np.where(amax > 0, amax / np.float32(127), 1).astype(np.float32))
    assert scale[2, 0] == 1 and not codes[2].any()
    assert np.abs(codes).max(axis=1).tolist() == [0 if a == 0 else 127 for a in amax[:, 0]]
    # round to nearest: every value within half a step of its code (float32 division rounding aside)
    err = np.abs(codes.astype(np.float64) * scale - w)
    assert np.all(err <= scale * (0.5 + 1e-6))
    # round half to even on exact ties
    tie = np.array([[127.0, 2.5, -2.5, 3.5, 0.5]], np.float32)
    assert quantize_int8_rows(tie)[0].tolist() == [[127, 2, -2, 4, 0]]


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_groups_symmetric(group_size):
    rng = np.random.default_rng(group_size)
    w = rng.normal(size=(5, 128)).astype(np.float32) * 0.02
    w[1, :group_size] = 0.0  # a group of zeros: scale 1, codes 0
    codes, scale, offset = quantize_int4_groups(w, group_size, False)
    assert offset is None and scale.dtype == np.float16 and scale.shape == (5, 128 // group_size)
    g = w.reshape(5, -1, group_size).astype(np.float64)
    amax = np.abs(g).max(axis=2)
    expected = np.where(amax > 0, (amax / 7).astype(np.float16), 1).astype(np.float16)
    np.testing.assert_array_equal(scale, expected)
    assert scale[1, 0] == 1 and not codes[1, :group_size].any()
    assert codes.min() >= -8 and codes.max() <= 7
    deq = codes.reshape(5, -1, group_size) * scale.astype(np.float64)[..., None]
    # the stored F16 scale may be below amax / 7 by a rounding: the extreme value then clamps to 7
    assert np.all(np.abs(deq - g) <= scale.astype(np.float64)[..., None] * 0.5 + amax[..., None] * 2e-3)


def test_int4_groups_with_zero_point():
    rng = np.random.default_rng(7)
    w = (rng.normal(size=(4, 64)) * 0.05 + 0.01).astype(np.float32)
    w[2, :32] = np.abs(w[2, :32]) + 0.1  # all positive: the range still includes 0
    w[3, 32:] = 0.0
    codes, scale, offset = quantize_int4_groups(w, 32, True)
    assert codes.min() >= -8 and codes.max() <= 7 and offset.dtype == np.float32
    g = w.reshape(4, 2, 32).astype(np.float64)
    lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
    s = np.where(hi > lo, ((hi - lo) / 15).astype(np.float16), 1).astype(np.float16)
    np.testing.assert_array_equal(scale, s)
    zero = 8 - offset / scale.astype(np.float32)  # offset = (8 - z) · scale, exactly
    assert np.array_equal(zero, np.rint(zero)) and zero.min() >= 0 and zero.max() <= 15
    deq = codes.reshape(4, 2, 32) * s.astype(np.float64)[..., None] + offset[..., None]
    assert np.all(np.abs(deq - g) <= s.astype(np.float64)[..., None] * 0.51 + 1e-7)
    assert np.all(deq[3, 1] == 0)  # zero stays exact


# ---------------------------------------------------------------- the CPU op against float64

def _op_engine(path, llama_dir, x_rows, codes, int4, scale, scale_dtype, offset, bias, group_size):
    """embedding -> weight_only_linear -> gather_rows (write_one_op_engine): token i's activation is x_rows[i]."""
    N, K = codes.shape
    const = lambda a: (lambda: a)  # noqa: E731
    stored_scale = {"float32": scale.astype(np.float32), "float16": scale.astype(np.float16),
                    "bfloat16": float32_to_bf16(scale.astype(np.float32))}[scale_dtype]
    weights = {"w.weight": Parameter((N, K), "int4" if int4 else "int8",
                                     const(pack_int4(codes) if int4 else codes.astype(np.int8)), "w.weight"),
               "w.weight_scale": Parameter(scale.shape, scale_dtype, const(stored_scale), "w.weight_scale")}
    inputs = ["w.weight", "w.weight_scale"]
    if offset is not None:
        weights["w.weight_offset"] = Parameter(offset.shape, "float32", const(offset), "w.weight_offset")
        inputs.append("w.weight_offset")
    if bias is not None:
        weights["w.bias"] = Parameter((N,), "float32", const(bias), "w.bias")
        inputs.append("w.bias")
    write_one_op_engine(path, llama_dir, x_rows, N, "weight_only_linear", inputs, weights,
                        {"group_size": group_size, "has_offset": offset is not None}, max_batch_size=300)
    return {"float32": scale.astype(np.float64), "float16": stored_scale.astype(np.float64),
            "bfloat16": ((stored_scale.astype(np.uint32) << 16).view(np.float32)).astype(np.float64)}[scale_dtype]


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("int4, K, group_size, has_offset, has_bias, scale_dtype", [
    (False, 128, 128, False, False, "float32"),  # W8A16 per channel
    (False, 128, 32, True, True, "float16"),
    (False, 37, 37, False, True, "bfloat16"),   # odd K: a padded chunk
    (False, 96, 48, True, False, "float32"),    # groups not a multiple of 16
    (True, 128, 32, False, False, "float16"),   # W4A16
    (True, 128, 64, True, True, "float16"),     # W4A16 with zero point
    (True, 128, 128, False, True, "bfloat16"),
    (True, 96, 16, True, False, "float32"),
    (True, 36, 18, False, True, "float32"),
    (False, 1088, 1088, False, True, "float16"),  # AMX tiles: one group over more than a chunk of 32 k steps
    (True, 1088, 64, True, False, "float32"),    # AMX tiles: groups across a chunk boundary
])
def test_cpu_weight_only_linear_against_float64(llama_dir, tmp_path, int4, K, group_size, has_offset, has_bias,
                                                scale_dtype, cpu_amx):
    """With cpu_amx, shapes whose groups are whole steps of 32 k run on AMX tiles (cpu/amx_weight_only.cc),
    the others on the FMA kernels, each against its own bound."""
    amx = cpu_amx and (group_size % 32 == 0 or group_size == K)
    rng = np.random.default_rng(K + group_size + 2 * int4 + has_offset)
    N, G = 70, K // group_size  # N = 70 (>= the 64 token ids): tails of the 8-row tasks and 4-row tiles
    x = rng.normal(size=(64, K)).astype(np.float32) * np.exp2(rng.uniform(-4, 4, size=(64, 1))).astype(np.float32)
    x[0] = 0.0
    lo, hi = (-8, 8) if int4 else (-128, 128)
    codes = rng.integers(lo, hi, size=(N, K)).astype(np.int8)
    scale = np.exp2(rng.uniform(-8, 0, size=(N, G))).astype(np.float32)
    offset = rng.normal(size=(N, G)).astype(np.float32) * 0.1 if has_offset else None
    bias = rng.normal(size=N).astype(np.float32) if has_bias else None
    s64 = _op_engine(tmp_path, llama_dir, x, codes, int4, scale, scale_dtype, offset, bias, group_size)
    # the float64 reference: W[n, k] = q · scale[n, k / G] + offset[n, k / G]; y = x · Wᵀ + bias
    o64 = offset.astype(np.float64) if has_offset else np.zeros((N, G))
    w64 = codes * np.repeat(s64, group_size, axis=1) + np.repeat(o64, group_size, axis=1)
    b64 = bias.astype(np.float64) if has_bias else np.zeros(N)
    magnitude = np.abs(x).astype(np.float64) @ (np.abs(codes) * np.repeat(s64, group_size, axis=1) +
                                                np.repeat(np.abs(o64), group_size, axis=1)).T + np.abs(b64)
    session = RunnerSession(tmp_path, tokens_per_block=4, num_kv_blocks=1024)
    seq = 0
    results = {}
    # 65: a full 64-token block, then one token alone in its block, which takes the one-token (decode) path;
    # 300: AMX tiles split x in chunks of 256 rows
    for M in (1, 3, 17, 64, 65, 300):
        tokens = [int(t) for t in rng.permutation(64)[:M]]
        if M >= 64:
            tokens = [int(t) for t in rng.permutation(64)] + [int(t) for t in rng.integers(0, 64, M - 64)]
        out = session.step({seq + i: [t] for i, t in enumerate(tokens)})
        got = np.stack([out[seq + i] for i in range(M)])
        seq += M
        expected = x[tokens].astype(np.float64) @ w64.T + b64
        # float32 rounding of each product and partial sum: at most about (K / 16 + G + 5) roundings
        # of 2^-24 relative to the magnitude Σ |x|·(|q|·s + |o|) + |bias|. AMX tiles: x split to 2^-16 |x|,
        # and each group's sum of 2 group_size products, the groups' fma chain and x's sums round
        tol = (K / 16 + G + 8) * 2.0 ** -24 * magnitude[tokens]
        if amx:
            tol = (2.0 ** -16 + (2 * K + 2 * G + 8) * 2.0 ** -24) * magnitude[tokens]
        assert np.all(np.abs(got - expected) <= tol), np.max(np.abs(got - expected) / magnitude[tokens])
        for i, t in enumerate(tokens):
            results.setdefault(t, []).append(got[i])
    if has_bias:
        np.testing.assert_array_equal(results[0][0], bias)  # x = 0
    # a token's row is bitwise the same in every batch it was in
    for rows in results.values():
        for r in rows[1:]:
            np.testing.assert_array_equal(r, rows[0])


# ---------------------------------------------------------------- whole models

@pytest.fixture(scope="module")
def engines(llama_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    dirs = {}
    for name, quant in VARIANTS.items():
        dirs[name] = tmp_path_factory.mktemp(name)
        build(model, BuildConfig(max_seq_len=128), quant).save(dirs[name])
    return dirs


def _dequantized(engine: Engine, name: str) -> np.ndarray:
    """The float64 weight a weight_only_linear's codes, scales and offsets stand for, by numpy alone."""
    node = next(n for n in engine.graph["nodes"] if n["op"] == "weight_only_linear" and n["inputs"][1] == name)
    G = node["attrs"]["group_size"]
    w = engine.weights[name]
    raw = w.load()
    q = (unpack_int4(raw) if w.dtype == "int4" else raw).astype(np.float64)
    s = engine.weights[node["inputs"][2]].load().astype(np.float64)  # the builder's: float16 or float32
    deq = q * np.repeat(s, G, axis=1)
    if node["attrs"]["has_offset"]:
        deq += np.repeat(engine.weights[node["inputs"][3]].load().astype(np.float64), G, axis=1)
    return deq


def _hf_with_dequantized_weights(llama_dir, engine_dir):
    """The HF model with each quantized projection replaced by the dequantized engine weight."""
    hf = load_hf_model(llama_dir)
    engine = Engine.load(engine_dir)
    params = dict(hf.named_parameters())
    for node in engine.graph["nodes"]:
        if node["op"] != "weight_only_linear":
            continue
        name = node["inputs"][1]
        deq = torch.from_numpy(_dequantized(engine, name)).float()
        parent, module, leaf = name.rsplit(".", 2)
        parts = STACKED_PROJECTIONS.get(module, (module,))
        row = 0
        for part in parts:
            p = params[f"{parent}.{part}.{leaf}"]
            with torch.no_grad():
                p.copy_(deq[row:row + p.shape[0]])
            row += p.shape[0]
        assert row == deq.shape[0]
    return hf


def test_build_rewrites_linears_except_lm_head(engines):
    for name, quant in VARIANTS.items():
        config = json.loads((engines[name] / "config.json").read_text())
        assert QuantConfig.from_dict(config["quantization"]) == quant
        nodes = {n["inputs"][1]: n for n in config["graph"]["nodes"] if "linear" in n["op"]}
        assert nodes.pop("lm_head.weight")["op"] == "linear"
        assert len(nodes) == 8 and {n["op"] for n in nodes.values()} == {"weight_only_linear"}
        engine = Engine.load(engines[name])
        down = nodes["model.layers.0.mlp.down_proj.weight"]
        int4 = quant.quant_algo == QuantAlgo.W4A16
        assert down["attrs"] == {"group_size": quant.group_size if int4 else 128, "has_offset": quant.has_zero_point}
        assert engine.weights[down["inputs"][1]].dtype == ("int4" if int4 else "int8")
        assert engine.weights[down["inputs"][2]].dtype == ("float16" if int4 else "float32")
        assert engine.weights[down["inputs"][2]].shape == ((64, 128 // quant.group_size) if int4 else (64, 1))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_and_tokens_match_hf_on_the_dequantized_weights(llama_dir, engines, variant, cpu_amx):
    hf = _hf_with_dequantized_weights(llama_dir, engines[variant])
    plain = load_hf_model(llama_dir)
    rng = np.random.default_rng(5)
    for prompt in random_prompts(rng, [3, 17, 40]):
        ours = RunnerSession(engines[variant]).step({0: prompt})[0]
        assert relative_error(ours, hf_last_logits(hf, prompt)) < 1e-4
        assert relative_error(ours, hf_last_logits(plain, prompt)) > 1e-4  # really quantized
    llm = LLM(str(engines[variant]))
    prompts = random_prompts(rng, [6, 11])
    out = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for prompt, o in zip(prompts, out):
        assert o.outputs[0].token_ids == hf_greedy(hf, prompt, 10)


_GREEDY = """
import sys
from rtllm import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate([[5, 6, 7, 8], [40, 41], [9] * 20], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
print([o.outputs[0].token_ids for o in out])
"""


@pytest.mark.parametrize("variant", ["w8", "w4g64zp"])
def test_quantize_save_load_in_a_fresh_process_and_batch_invariance(llama_dir, engines, variant, cpu_amx):
    llm = LLM(llama_dir, quant_config=VARIANTS[variant], max_seq_len=128)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8], [40, 41], [9] * 20]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone
    fresh = subprocess.run([sys.executable, "-c", _GREEDY, str(engines[variant])], capture_output=True, text=True,
                           check=True)
    assert fresh.stdout.strip() == str(batched)


def test_cli_build_w4a16(llama_dir, tmp_path):
    out = tmp_path / "engine"
    subprocess.run([sys.executable, "-m", "rtllm.cli", "build", str(llama_dir), "-o", str(out), "--max-seq-len",
                    "128", "--quant-algo", "W4A16", "--group-size", "32", "--has-zero-point"],
                   check=True, capture_output=True, text=True)
    config = json.loads((out / "config.json").read_text())["quantization"]
    assert (config["quant_algo"], config["group_size"], config["has_zero_point"]) == ("W4A16", 32, True)
    refused = subprocess.run([sys.executable, "-m", "rtllm.cli", "build", str(llama_dir), "-o", str(tmp_path / "x"),
                              "--group-size", "32"], capture_output=True, text=True)
    assert refused.returncode != 0 and "--quant-algo W4A16" in refused.stderr


def test_tied_embedding_stays_unquantized(tiny_model):
    model = AutoModelForCausalLM.from_hugging_face(tiny_model("llama", tie=True))
    engine = build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="W4A16", group_size=32,
                                                                   exclude_modules=[]))
    head = next(n for n in engine.graph["nodes"] if "model.embed_tokens.weight" in n["inputs"] and "linear" in n["op"])
    assert head["op"] == "linear" and engine.weights["model.embed_tokens.weight"].dtype == "float32"
    assert engine.quantization_report.kept == {"model.embed_tokens.weight": "tied to the embedding"}


# ---------------------------------------------------------------- refusals

def test_group_size_not_dividing_k_is_refused(llama_dir):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)  # hidden 64: group 128 does not divide K = 64
    message = "W4A16: linear 'model.layers.0.self_attn.qkv_proj' has K=64 input features, not a multiple of " \
              "group_size=128"
    with pytest.raises(ValueError, match=message):
        build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="W4A16", group_size=128))
    with pytest.raises(ValueError, match="group_size=96 is not one of 32, 64, 128 \\(needed by W4A16\\)"):
        QuantConfig(quant_algo="W4A16", group_size=96)


def test_w4a8_awq_stays_refused(llama_dir):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    with pytest.raises(ValueError, match="quant_algo W4A8_AWQ is not implemented yet: rtllm builds FP8, "
                                         "FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16"):
        build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="W4A8_AWQ", group_size=64))


def _edited(engine_dir, tmp_path, edit):
    """A copy of engine_dir whose first weight_only_linear node is changed by edit(node)."""
    shutil.copytree(engine_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    edit(next(n for n in config["graph"]["nodes"] if n["op"] == "weight_only_linear"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("edit, message", [
    (lambda n: n["attrs"].update(group_size=64),
     'scale "model.layers.0.self_attn.qkv_proj.weight_scale" has shape \\[128, 2\\], expected \\[128, 1\\]'),
    (lambda n: n["attrs"].update(group_size=48), "group_size 48 of weight .* must be a positive divisor of K = 64"),
    (lambda n: n["attrs"].pop("group_size"), "has no group_size attr"),
    (lambda n: n["inputs"].__setitem__(2, "model.layers.0.input_layernorm.weight"),
     'scale "model.layers.0.input_layernorm.weight" has shape \\[64\\], expected \\[128, 2\\]'),
    (lambda n: n["attrs"].update(has_offset=True), 'op "weight_only_linear" takes 4..5 inputs, the node has 3'),
    # attrs that would change the semantics are refused, not ignored
    (lambda n: n["attrs"].update(has_g_idx=True), "has has_g_idx true; rtllm takes only has_g_idx false"),
    (lambda n: n["attrs"].update(bits=4), 'has attr "bits" \\(4\\), which the CPU backend does not support'),
    (lambda n: n["attrs"].update(has_offset=1), "attr has_offset of weight .* is 1, expected true or false"),
])
def test_malformed_engine_is_refused_at_load(engines, tmp_path, edit, message):
    path = _edited(engines["w4g32"], tmp_path, edit)
    with pytest.raises(RtllmError, match=message):
        RunnerSession(path)


def test_has_g_idx_false_is_taken(engines, tmp_path):
    """has_g_idx false (no permutation of the groups) is the default: the same logits as without it."""
    path = _edited(engines["w4g32"], tmp_path, lambda n: n["attrs"].update(has_g_idx=False))
    np.testing.assert_array_equal(RunnerSession(path).step({0: [3, 4, 5]})[0],
                                  RunnerSession(engines["w4g32"]).step({0: [3, 4, 5]})[0])


def test_weight_dtype_refused_at_load(engines, tmp_path):
    """A float weight in the codes' place: refused naming the op, the dtype and the supported ones."""
    path = _edited(engines["w8"], tmp_path, lambda n: n["inputs"].__setitem__(1, "model.embed_tokens.weight"))
    with pytest.raises(RtllmError, match='op "weight_only_linear" on the CPU backend does not support dtype F32 for '
                                         'input 1 \\("model.embed_tokens.weight"\\); supported: I8, I4'):
        RunnerSession(path)


def test_both_readers_accept_weight_only_engines(engines):
    for name, quant in VARIANTS.items():
        assert Engine.load(engines[name]).config["quantization"]["quant_algo"] == quant.quant_algo.value
        assert _core.Engine.load(str(engines[name])).max_seq_len == 128
