"""quant_algo FP8 (static per-tensor FP8 linears) and calibrated K/V scales of an FP8 KV cache on the
CPU: the static fp8_linear op and the scaled FP8 attention against float64 numpy references with an
E4M3 rounding computed here from the format's bit layout; the runtime's calibration observers against
HF transformers' activations; engines built with FP8 + FP8 KV against HF; save/load in a fresh process;
bad calibration inputs and refusals."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import rtllm
import rtllm.cli
from engine_fixture import (RunnerSession, TinyModel, random_tokens, reference_logits, write_engine,
                            write_one_op_engine)
from hf_reference import load_hf_model, random_prompts, relative_error
from rtllm import LLM, SamplingParams, _core
from rtllm.builder import BuildConfig, Engine
from rtllm.builder.tensor import Parameter
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantAlgo, QuantConfig
from rtllm.quantization.calibration import calibrate, default_corpus_path, load_calib_texts, tokenize_samples

FP8 = QuantConfig(quant_algo=QuantAlgo.FP8, kv_cache_quant_algo=QuantAlgo.FP8, calib_size=16,
                  calib_max_seq_length=64)


# ---------------------------------------------------------------- an independent E4M3 rounding


def _e4m3_values() -> np.ndarray:
    """The 126 non-negative finite E4M3 ("fn") values, ascending, from the bit layout: 4 exponent bits
    (bias 7), 3 mantissa bits, subnormals at exponent 0, code 0x7F the NaN."""
    values = []
    for code in range(0x7F):
        e, m = code >> 3, code & 7
        values.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(values)


E4M3_VALUES = _e4m3_values()


def e4m3_decode(codes) -> np.ndarray:
    """E4M3 codes (no NaN) -> float64 values: bit 7 the sign, the rest an index into E4M3_VALUES."""
    codes = np.asarray(codes, np.uint8)
    return np.where(codes & 0x80, -1.0, 1.0) * E4M3_VALUES[codes & 0x7F]


def e4m3_rne(x) -> np.ndarray:
    """Nearest E4M3 value, ties to the even code (the one with an even mantissa), saturated to +-448."""
    x = np.asarray(x, np.float64)
    a = np.minimum(np.abs(x), 448.0)
    hi = np.clip(np.searchsorted(E4M3_VALUES, a), 1, len(E4M3_VALUES) - 1)
    lo = hi - 1
    d_lo, d_hi = a - E4M3_VALUES[lo], E4M3_VALUES[hi] - a
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.sign(x) * E4M3_VALUES[np.where(pick_hi, hi, lo)]


def test_e4m3_reference_is_rtllms_conversion():
    """The test's rounding agrees with rtllm's float_to_fp8_e4m3 (ties, subnormals, saturation) and with
    torch's float8_e4m3fn cast within range."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=5000) * np.exp2(rng.uniform(-12, 10, 5000)),
                        (E4M3_VALUES[:-1] + E4M3_VALUES[1:]) / 2,       # every tie
                        [0.0, 448.0, 464.0, 1e6, -1e6, 2.0 ** -10, 2.0 ** -9]]).astype(np.float32)
    codes = np.asarray(_core.convert_floats(x.view(np.uint8), "F32", "F8_E4M3"), np.uint8)
    ours = np.asarray(_core.convert_floats(codes, "F8_E4M3", "F32"), np.uint8).view(np.float32)
    np.testing.assert_array_equal(ours, e4m3_rne(x))
    clipped = np.clip(x, -448, 448)
    np.testing.assert_array_equal(torch.from_numpy(clipped).to(torch.float8_e4m3fn).double().numpy(),
                                  e4m3_rne(x))


# ---------------------------------------------------------------- the static fp8_linear op


def static_fp8_linear(x, w_values, weight_scale, input_scale, bias):
    """docs/engine_format.md: q = e4m3(x / input_scale) (float32 division), y = (q·wᵀ) · input_scale ·
    weight_scale + bias, the product in float64."""
    q = e4m3_rne(np.asarray(x, np.float32) / np.float32(input_scale))
    return (q @ w_values.T) * float(input_scale) * float(weight_scale) + bias


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


def _static_op_engine(path, llama_dir, x_rows, w_codes, weight_scale, input_scale, bias, attrs=None):
    """embedding -> fp8_linear (static) -> gather_rows (write_one_op_engine): token i's activation is x_rows[i]."""
    N = w_codes.shape[0]
    const = lambda a: (lambda: a)  # noqa: E731
    weights = {
        "w.weight": Parameter(w_codes.shape, "float8_e4m3", const(w_codes), "w.weight"),
        "w.weight_scale": Parameter((1,), "float32", const(np.array([weight_scale], np.float32)), "w.weight_scale"),
        "w.input_scale": Parameter((1,), "float32", const(np.array([input_scale], np.float32)), "w.input_scale"),
    }
    inputs = ["w.weight", "w.weight_scale", "w.input_scale"]
    if bias is not None:
        weights["w.bias"] = Parameter((N,), "float32", const(bias), "w.bias")
        inputs.append("w.bias")
    write_one_op_engine(path, llama_dir, x_rows, N, "fp8_linear", inputs, weights,
                        {"activation_scaling": "static"} if attrs is None else attrs)


@pytest.mark.parametrize("K, N, with_bias", [(64, 48, True), (37, 50, False)])  # 37, 50: the SIMD tails
def test_cpu_static_fp8_linear_against_float64(llama_dir, tmp_path, K, N, with_bias):
    rng = np.random.default_rng(K)
    x = rng.normal(size=(40, K)).astype(np.float32)
    x[0] = 0.0                              # zeros: y = bias
    x[1, 3] = 1e4                           # far beyond the calibrated range: saturates to 448 · input_scale
    x[2] *= np.float32(1e-6)                # tiny: E4M3 subnormals and zeros
    input_scale = np.float32(3.0 / 448)     # "calibrated" on |x| <= 3: larger values saturate
    codes = rng.integers(0, 256, size=(N, K)).astype(np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x3C    # no NaN codes
    w_values = e4m3_decode(codes)
    weight_scale = np.float32(0.0123)
    bias = rng.normal(size=N).astype(np.float32) if with_bias else None
    _static_op_engine(tmp_path, llama_dir, x, codes, weight_scale, input_scale, bias)
    session = RunnerSession(tmp_path, tokens_per_block=4, num_kv_blocks=64)
    tokens = [int(t) for t in rng.permutation(len(x))]
    out = session.step({i: [t] for i, t in enumerate(tokens)})
    got = np.stack([out[i] for i in range(len(tokens))]).astype(np.float64)
    b = bias if with_bias else np.zeros(N)
    expected = static_fp8_linear(x[tokens], w_values, weight_scale, input_scale, b)
    np.testing.assert_array_equal(got[tokens.index(0)], b.astype(np.float32))
    # exact E4M3 products summed in float32 over K <= 64 terms, then two float32 products: within
    # (K + 3)·2^-24 < 1e-5 of Σ|q|·|w| · input_scale · weight_scale + |bias|
    q = e4m3_rne(x[tokens] / input_scale)
    magnitude = (np.abs(q) @ np.abs(w_values).T) * float(input_scale) * float(weight_scale) + np.abs(b)
    assert np.all(np.abs(got - expected) <= 1e-5 * magnitude), np.max(np.abs(got - expected) / magnitude)
    # the saturated row really is clipped: the same as a row holding 448 · input_scale there
    clipped = x[1].copy()
    clipped[3] = 448 * input_scale
    np.testing.assert_allclose(got[tokens.index(1)], static_fp8_linear(clipped[None], w_values, weight_scale,
                                                                       input_scale, b)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attrs, input_scale, message", [
    ({"activation_scaling": "per_tensor"}, 1.0, 'activation_scaling "per_tensor" is not one of'),
    ({"activation_scaling": "static"}, 0.0, "input_scale 0 must be finite and > 0"),
    ({"activation_scaling": "static"}, float("nan"), "input_scale nan must be finite and > 0"),
])
def test_static_fp8_linear_refusals(llama_dir, tmp_path, attrs, input_scale, message):
    codes = np.full((8, 16), 0x38, np.uint8)
    _static_op_engine(tmp_path, llama_dir, np.ones((4, 16), np.float32), codes, 1.0, input_scale, None, attrs)
    with pytest.raises(Exception, match=message):
        RunnerSession(tmp_path).step({0: [1]})


# ---------------------------------------------------------------- attention with k_scale / v_scale


class ScaledKvRound:
    """kv_round for engine_fixture.reference_logits, which calls it on K then on V of each layer in
    turn: e4m3(x / scale) · scale with that layer's k_scale or v_scale (float32 division)."""

    def __init__(self, scales):
        self.scales = [s for pair in scales for s in pair]  # k0, v0, k1, v1, ...
        self.calls = 0

    def __call__(self, x):
        scale = np.float32(self.scales[self.calls % len(self.scales)])
        self.calls += 1
        return e4m3_rne(np.asarray(x, np.float32) / scale) * float(scale)


def _set_kv_scales(path, scales):
    config = json.loads((path / "config.json").read_text())
    for node in config["graph"]["nodes"]:
        if node["op"] == "attention":
            node["attrs"]["k_scale"], node["attrs"]["v_scale"] = scales[node["attrs"]["layer_idx"]]
    (path / "config.json").write_text(json.dumps(config))


# layer 0: k_scale small enough that the largest keys saturate; layer 1: scales above 1 (more rounding)
SCALES = [(0.004, 0.02), (1.5, 0.75)]


@pytest.mark.parametrize("fields, fused", [(dict(), True), (dict(head_dim=32, qk_norm=True), True),
                                           (dict(num_heads=8, num_kv_heads=2), False)])
def test_runner_scaled_fp8_kv_against_float64(tmp_path, fields, fused):
    m = TinyModel(**fields)
    path = write_engine(tmp_path / "e", m, fused=fused)
    _set_kv_scales(path, SCALES)
    session = RunnerSession(path, tokens_per_block=4, num_kv_blocks=128, kv_cache_dtype="F8_E4M3")
    rng = np.random.default_rng(7)
    prompts = {0: random_tokens(rng, m, 37), 1: random_tokens(rng, m, 5)}
    out = session.step(prompts)
    unscaled_error = []
    for _ in range(3):
        for s, logits in out.items():
            tokens = session.tokens[s]
            expected = reference_logits(m, tokens, kv_round=ScaledKvRound(SCALES))[-1]
            assert np.max(np.abs(logits - expected)) <= 1e-5 * np.max(np.abs(expected))
            unscaled = reference_logits(m, tokens, kv_round=ScaledKvRound([(1.0, 1.0)] * 2))[-1]
            unscaled_error.append(np.max(np.abs(logits - unscaled)) / np.max(np.abs(unscaled)))
        out = session.step({s: random_tokens(rng, m, 1) for s in prompts})
    assert min(unscaled_error) > 1e-3  # the scales really change what the cache holds


@pytest.mark.parametrize("k_scale, message", [(0.0, "k_scale 0 must be finite and > 0"),
                                              (-1.0, "k_scale -1 must be finite and > 0"),
                                              (1e300, "k_scale inf must be finite and > 0")])  # float32 overflow
def test_attention_refuses_bad_kv_scales(tmp_path, k_scale, message):
    path = write_engine(tmp_path / "e", TinyModel())
    _set_kv_scales(path, [(float(k_scale), 1.0)] * 2)
    with pytest.raises(Exception, match=message):
        RunnerSession(path, kv_cache_dtype="F8_E4M3")


# ---------------------------------------------------------------- calibration on the runtime vs HF


def test_calibration_amax_matches_hf(llama_dir):
    """The runner's observers (linear inputs) and its KV pool (K after RoPE, V) against HF's float32
    forward over the same tokens: forward pre-hooks on the HF linears, K/V from past_key_values."""
    texts = ["A short sentence about rivers and the sea.", "Numbers: 3, 14, 159, 2653; words after them.",
             "The third sample is a little longer than the others, so that it spans more positions " * 3]
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    qc = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8", calib_max_seq_length=48)
    layers = model.config.num_layers
    weights = [f"model.layers.{i}.{n}.weight" for i in range(layers)
               for n in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")]
    calib = calibrate(model, BuildConfig(), qc, texts, weights)
    samples = tokenize_samples(model, texts, qc.calib_size, 48)
    assert calib.num_samples == 3 and calib.num_tokens == sum(map(len, samples)) and max(map(len, samples)) == 48

    hf = load_hf_model(llama_dir)
    hf_amax, hooks = {}, []
    for i, layer in enumerate(hf.model.layers):
        for ours, module in (("self_attn.qkv_proj", layer.self_attn.q_proj), ("self_attn.o_proj", layer.self_attn.o_proj),
                             ("mlp.gate_up_proj", layer.mlp.gate_proj), ("mlp.down_proj", layer.mlp.down_proj)):
            name = f"model.layers.{i}.{ours}.weight"

            def hook(_, args, name=name):
                hf_amax[name] = max(hf_amax.get(name, 0.0), float(args[0].abs().max()))
            hooks.append(module.register_forward_pre_hook(hook))
    kv = np.zeros((layers, 2))
    with torch.no_grad():
        for ids in samples:
            cache = hf(torch.tensor([ids]), use_cache=True).past_key_values
            for i in range(layers):
                k, v = cache.layers[i].keys, cache.layers[i].values
                kv[i] = np.maximum(kv[i], [float(k.abs().max()), float(v.abs().max())])
    for h in hooks:
        h.remove()
    assert set(calib.linear_amax) == set(weights)
    for name in weights:
        np.testing.assert_allclose(calib.linear_amax[name], hf_amax[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.array(calib.kv_amax), kv, rtol=1e-5)


def test_observers_and_kv_amax_refusals(tmp_path):
    path = write_engine(tmp_path / "e", TinyModel())
    session = RunnerSession(path)
    with pytest.raises(Exception, match='observe_amax: "nope" is not the output of a node'):
        session.runner.observe_amax(["nope"])
    with pytest.raises(Exception, match="kv_cache_amax: 9 tokens need 3 blocks, the block table has 2"):
        session.runner.kv_cache_amax([0, 1], 9)
    fp8 = RunnerSession(path, kv_cache_dtype="F8_E4M3")
    with pytest.raises(Exception, match=r"kv_cache_amax reads an unquantized KV cache \(F32, BF16 or F16\); this runner.s is F8_E4M3"):
        fp8.runner.kv_cache_amax([0], 1)


# ---------------------------------------------------------------- FP8 engines


@pytest.fixture(scope="module")
def fp8_engine(llama_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    engine = rtllm.quantize(model, FP8, build_config=BuildConfig(max_seq_len=128))
    path = tmp_path_factory.mktemp("fp8-static")
    engine.save(path)
    return path, engine.quantization_report


def test_build_swaps_linears_and_sets_the_scales(fp8_engine):
    path, report = fp8_engine
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "FP8"
    nodes = config["graph"]["nodes"]
    linears = {n["inputs"][1]: n for n in nodes if "linear" in n["op"]}
    assert linears.pop("lm_head.weight")["op"] == "linear"
    assert len(linears) == 8 and all(n["op"] == "fp8_linear" and n["attrs"] == {"activation_scaling": "static"}
                                     for n in linears.values())
    engine = Engine.load(path)
    for name, node in linears.items():
        module = name[:-len(".weight")]
        assert node["inputs"][1:4] == [name, module + ".weight_scale", module + ".input_scale"]
        assert engine.weights[module + ".input_scale"].load().tolist() == [np.float32(report.input_scales[name])]
    attn = [n["attrs"] for n in nodes if n["op"] == "attention"]
    assert [(a["k_scale"], a["v_scale"]) for a in attn] == report.kv_scales
    assert report.calib_samples == 16 and 0 < report.calib_tokens <= 16 * 64
    assert "calibrated on 16 samples" in report.summary()


def test_fused_weight_has_one_scale_over_all_rows(llama_dir, fp8_engine):
    path, _ = fp8_engine
    hf = load_hf_model(llama_dir)
    engine = Engine.load(path)
    attn = hf.model.layers[1].self_attn
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().numpy()
    scale = engine.weights["model.layers.1.self_attn.qkv_proj.weight_scale"].load()
    assert scale.tolist() == [np.float32(np.abs(w).max()) / np.float32(448)]
    codes = engine.weights["model.layers.1.self_attn.qkv_proj.weight"].load()
    decoded = e4m3_decode(codes)
    np.testing.assert_array_equal(decoded, e4m3_rne(w.astype(np.float32) / scale[0]))


def _all_logits(engine_dir, prompt):
    session = RunnerSession(engine_dir, num_kv_blocks=64)
    table = np.array([session.free[:len(prompt) // 4 + 1]], np.int32)
    return session.runner.forward(prompt, [len(prompt)], [0], table, list(range(len(prompt))))


def test_fp8_engine_close_to_hf(llama_dir, fp8_engine):
    """Teacher-forced over random prompts, every position: FP8 weights and activations with per-tensor
    scales (each E4M3 rounding ≈ 3.6% RMS, two per product, eight linears chained) plus an E4M3 KV cache
    with calibrated scales (≈ 2% alone). Measured on this model and two other seeds: relative L2 error of
    the logits 7-8% per prompt, top-1 agreement with HF 90-95% (the tiny random model's logits are close
    together, so rounding flips some). The bounds (0.15, 80%) leave margin; the lower bound shows the
    engine really is quantized."""
    path, _ = fp8_engine
    hf = load_hf_model(llama_dir)
    rng = np.random.default_rng(5)
    agree = total = 0
    for prompt in random_prompts(rng, [20, 33, 60]):
        ours = _all_logits(path, prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].double().numpy()
        assert 1e-4 < relative_error(ours, ref) < 0.15
        agree += int(np.sum(ours.argmax(-1) == ref.argmax(-1)))
        total += len(prompt)
    assert agree / total >= 0.8, agree / total


def test_fp8_inputs_quantized_by_their_producers(llama_dir, fp8_engine, tmp_path):
    """The norms and silu_mul that feed static fp8_linears write E4M3 codes with the linear's input scale
    (passes.fuse_fp8_input_quantization); o_proj's input, attention's output, stays float. On the CPU those
    codes are the ones the linear computes itself from a float input, so the same model built without the
    passes (add + norm unfused too) gives the same logits, bit for bit."""
    path, report = fp8_engine
    graph = json.loads((path / "config.json").read_text())["graph"]
    dtypes = {t["name"]: t["dtype"] for t in graph["tensors"]}
    producers = {o: n for n in graph["nodes"] for o in n["outputs"]}
    fp8 = [n for n in graph["nodes"] if n["op"] == "fp8_linear"]
    from_codes = {n["inputs"][1] for n in fp8 if dtypes.get(n["inputs"][0]) == "float8_e4m3"}
    assert from_codes == {n["inputs"][1] for n in fp8 if ".o_proj." not in n["inputs"][1]}
    assert len(from_codes) == 6  # qkv, gate_up and down of both layers
    for node in fp8:
        x = node["inputs"][0]
        if dtypes.get(x) == "float8_e4m3":
            producer = producers[x]
            assert producer["op"] in ("rms_norm", "add_rms_norm", "silu_mul") and producer["outputs"][0] == x
            assert producer["attrs"]["output_scale"] == np.float32(report.input_scales[node["inputs"][1]])

    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    unfused = rtllm.quantize(model, FP8, build_config=BuildConfig(max_seq_len=128, fuse=False))
    assert unfused.quantization_report.input_scales == report.input_scales
    unfused.save(tmp_path / "unfused")
    graph = json.loads((tmp_path / "unfused" / "config.json").read_text())["graph"]
    assert all(t["dtype"] != "float8_e4m3" for t in graph["tensors"])
    assert not any("output_scale" in n["attrs"] for n in graph["nodes"])
    for prompt in random_prompts(np.random.default_rng(9), [7, 40]):
        np.testing.assert_array_equal(_all_logits(path, prompt), _all_logits(tmp_path / "unfused", prompt))


def test_fp8_output_refusals(llama_dir, fp8_engine, tmp_path):
    """An F8_E4M3 norm output without a usable output_scale, and codes fed to a per-token fp8_linear, are
    refused at load, naming them."""
    path, _ = fp8_engine
    config = json.loads((path / "config.json").read_text())
    nodes = config["graph"]["nodes"]
    norm = next(n for n in nodes if n["op"] == "add_rms_norm" and "output_scale" in n["attrs"])
    for i, bad in enumerate((None, -1.0, 0.0, 1e39)):  # 1e39: infinite as float32
        edited = json.loads(json.dumps(config))
        target = next(n for n in edited["graph"]["nodes"] if n["outputs"] == norm["outputs"])
        if bad is None:
            del target["attrs"]["output_scale"]
        else:
            target["attrs"]["output_scale"] = bad
        broken = tmp_path / f"bad_scale{i}"
        shutil.copytree(path, broken)
        (broken / "config.json").write_text(json.dumps(edited))
        with pytest.raises(Exception, match="output_scale"):
            LLM(str(broken), skip_tokenizer_init=True)
    broken = tmp_path / "per_token_codes"
    shutil.copytree(path, broken)
    edited = json.loads(json.dumps(config))
    linear = next(n for n in edited["graph"]["nodes"] if n["op"] == "fp8_linear" and ".down_proj." in n["inputs"][1])
    linear["attrs"]["activation_scaling"] = "per_token"
    linear["inputs"] = linear["inputs"][:3]
    (broken / "config.json").write_text(json.dumps(edited))
    with pytest.raises(Exception, match="F8_E4M3"):
        LLM(str(broken), skip_tokenizer_init=True)


_GREEDY = """
import sys
from rtllm import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate([[5, 6, 7, 8], [40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
print([o.outputs[0].token_ids for o in out])
"""


def test_quantize_save_load_in_a_fresh_process(llama_dir, fp8_engine):
    """LLM(quant_config=FP8) (calibrating on the same data in-process) and the saved engine in a fresh
    process generate the same greedy tokens: calibration is deterministic and the engine round-trips."""
    path, _ = fp8_engine
    with LLM(llama_dir, quant_config=FP8, max_seq_len=128) as llm:
        out = llm.generate([[5, 6, 7, 8], [40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ours = [o.outputs[0].token_ids for o in out]
    fresh = subprocess.run([sys.executable, "-c", _GREEDY, str(path)], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == str(ours)


def test_per_channel_weights_with_calibrated_kv_scales(llama_dir):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    qc = QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN", kv_cache_quant_algo="FP8", calib_size=4)
    engine = rtllm.quantize(model, qc, ["one calibration text", "and another one"], BuildConfig(max_seq_len=128))
    report = engine.quantization_report
    assert report.calib_samples == 2 and not report.input_scales and len(report.kv_scales) == 2
    assert all(n["attrs"].get("activation_scaling", "per_token") == "per_token"
               for n in engine.graph["nodes"] if n["op"] == "fp8_linear")
    assert [(n["attrs"]["k_scale"], n["attrs"]["v_scale"]) for n in engine.graph["nodes"]
            if n["op"] == "attention"] == report.kv_scales


# ---------------------------------------------------------------- calibration data


def test_calib_data_forms(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first paragraph\nstill first\n\n\nsecond one\n")
    assert load_calib_texts(str(txt)) == ["first paragraph still first", "second one"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b c"}\n')
    assert load_calib_texts(jsonl) == ["a", "b c"]
    assert load_calib_texts(["x", "y"]) == ["x", "y"]
    corpus = load_calib_texts(None)
    assert default_corpus_path().endswith("calib_corpus.txt") and len(corpus) >= 40
    assert 20_000 <= sum(map(len, corpus)) <= 40_000


@pytest.mark.parametrize("calib_data, message", [
    (123, "calib_data=123 must be a list of strings"),
    ([], r"calib_data=\[\] is empty"),
    (["ok", ""], r"calib_data\[1\]='' is not a non-empty string"),
    (["ok", 5], r"calib_data\[1\]=5 is not a non-empty string"),
    ("/no/such/file.txt", "calib_data='/no/such/file.txt': no such file"),
])
def test_bad_calib_data(llama_dir, calib_data, message):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    with pytest.raises(ValueError, match=message):
        rtllm.quantize(model, FP8, calib_data, BuildConfig(max_seq_len=128))


def test_bad_calib_files(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="a.csv' must be a .txt or .jsonl file"):
        load_calib_texts(str(tmp_path / "a.csv"))
    (tmp_path / "e.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="e.txt' holds no text"):
        load_calib_texts(str(tmp_path / "e.txt"))
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ValueError, match='b.jsonl\' line 2 has no non-empty "text" string'):
        load_calib_texts(str(tmp_path / "b.jsonl"))


def test_cli_build_with_calib_data(llama_dir, tmp_path):
    data = tmp_path / "calib.txt"
    data.write_text("The first calibration paragraph.\n\nThe second one, a bit longer than the first.\n\nA third.\n")
    out = tmp_path / "engine"
    assert rtllm.cli.main(["build", str(llama_dir), "-o", str(out), "--max-seq-len", "128", "--quant-algo", "FP8",
                           "--kv-cache-quant-algo", "FP8", "--calib-data", str(data), "--calib-size", "2"]) == 0
    q = json.loads((out / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8" and q["calib_dataset"] == str(data) and q["calib_size"] == 2
    assert rtllm.cli.main(["build", str(llama_dir), "-o", str(tmp_path / "x"), "--calib-size", "2"]) == 2


def test_calibration_without_a_tokenizer_uses_random_ids(tmp_path):
    """A checkpoint without tokenizer.json (a random-weight benchmark model) calibrates on seeded random
    token ids, and says so; text calibration data still needs the tokenizer."""
    from checkpoints import make_hf_checkpoint
    from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE

    make_hf_checkpoint(tmp_path, arch="llama", vocab_size=VOCAB_SIZE, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model = AutoModelForCausalLM.from_hugging_face(tmp_path)
    qc = QuantConfig(quant_algo="FP8", calib_size=3, calib_max_seq_length=20)
    weights = ["model.layers.0.mlp.down_proj.weight"]
    with pytest.warns(UserWarning, match="no tokenizer.json: calibrating on 3 samples of random token ids"):
        calib = calibrate(model, BuildConfig(), qc, None, weights)
    assert (calib.num_samples, calib.num_tokens) == (3, 60) and calib.linear_amax[weights[0]] > 0
    with pytest.raises(ValueError, match="tokenizer.json"):
        calibrate(model, BuildConfig(), qc, ["some text"], weights)
