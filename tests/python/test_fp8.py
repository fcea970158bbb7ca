"""FP8_PER_CHANNEL_PER_TOKEN on the CPU: the quantize pass (E4M3 weights, per-channel scales), the CPU
fp8_linear op against a float64 reference of its semantics (graph_reference.fp8_linear, whose E4M3
rounding is torch's), whole models against the unquantized engine and HF, and the engine round trip."""
import json
import subprocess
import sys

import numpy as np
import pytest

from engine_fixture import RunnerSession, build_engine_dirs, write_one_op_engine
from graph_reference import e4m3, e4m3_decode, fp8_linear, run_graph
from hf_reference import hf_last_logits, load_hf_model, random_prompts, relative_error
from rtllm import LLM, SamplingParams, _core
from rtllm.builder import BuildConfig, Engine, build
from rtllm.builder.tensor import Parameter
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantAlgo, QuantConfig
from rtllm.quantization.quantize import quantize_rows

FP8_PCPT = QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)


def test_quantize_rows_matches_an_independent_e4m3():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 40)).astype(np.float32)
    w[3] = 0.0                                    # a row of zeros: scale 1, codes 0
    w[5] *= 1e30                                  # huge values
    w[7, 9] = 3e38                                # an outlier near float32's max
    codes, scale = quantize_rows(w)
    amax = np.abs(w).max(axis=1)
    expected_scale = np.where(amax > 0, amax / np.float32(448), 1).astype(np.float32)
    np.testing.assert_array_equal(scale, expected_scale)
    assert scale[3] == 1.0 and not codes[3].any()
    np.testing.assert_array_equal(e4m3_decode(codes), e4m3(w / expected_scale[:, None]))
    assert np.abs(e4m3_decode(codes)).max(axis=1).tolist() == [448.0 if a > 0 else 0.0 for a in amax]


def _op_engine(path, llama_dir, x_rows, w, bias):
    """embedding -> fp8_linear -> gather_rows (write_one_op_engine): token i's activation is x_rows[i]."""
    N = w.shape[0]
    const = lambda a: (lambda: a)  # noqa: E731
    codes, scale = quantize_rows(w)
    weights = {"w.weight": Parameter(w.shape, "float8_e4m3", const(codes), "w.weight"),
               "w.weight_scale": Parameter((N,), "float32", const(scale), "w.weight_scale"),
               "w.bias": Parameter((N,), "float32", const(bias), "w.bias")}
    write_one_op_engine(path, llama_dir, x_rows, N, "fp8_linear", ["w.weight", "w.weight_scale", "w.bias"], weights,
                        {}, FP8_PCPT)
    return codes, scale


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("K, N", [(64, 48), (37, 50)])  # K = 37, N = 50: the 8-lane and 16-column tails
def test_cpu_fp8_linear_against_float64(llama_dir, tmp_path, K, N):
    rng = np.random.default_rng(K)
    x = rng.normal(size=(40, K)).astype(np.float32) * np.exp2(rng.uniform(-8, 8, size=(40, 1))).astype(np.float32)
    x[0] = 0.0                       # zero row: s_t = FLT_MIN, y = bias
    x[1, 3] = 1e6                    # one outlier: the rest of the row rounds to E4M3 subnormals or zero
    x[2] *= np.float32(1e35)         # near float32's max: s_t stays finite
    x[3] = np.float32(448.0)         # exactly E4M3's max
    w = rng.normal(size=(N, K)).astype(np.float32)
    w[1] = 0.0
    w[2, 0] = 1e4
    bias = rng.normal(size=N).astype(np.float32)
    codes, scale = _op_engine(tmp_path, llama_dir, x, w, bias)
    session = RunnerSession(tmp_path, tokens_per_block=4, num_kv_blocks=64)
    tokens = [int(t) for t in rng.permutation(len(x))]
    out = session.step({i: [t] for i, t in enumerate(tokens)})
    got = np.stack([out[i] for i in range(len(tokens))])
    expected = fp8_linear(x[tokens], e4m3_decode(codes), scale, bias)
    np.testing.assert_array_equal(got[tokens.index(0)], bias)
    # float32 accumulation of exact E4M3 products over K <= 64 terms: at most K·2^-24 < 1e-5 of sum |x|·|w|
    magnitude = np.abs(x[tokens]).astype(np.float64) @ np.abs(w).T.astype(np.float64) + np.abs(bias)
    assert np.all(np.abs(got - expected) <= 1e-5 * magnitude), np.max(np.abs(got - expected) / magnitude)
    assert np.isfinite(got).all()


@pytest.fixture(scope="module")
def engines(llama_dir, tmp_path_factory):
    """(unquantized, FP8) engine dirs of the tiny llama."""
    return build_engine_dirs(llama_dir, tmp_path_factory, (("bf", None), ("fp8", FP8_PCPT)))


def test_build_swaps_linears_except_lm_head(engines):
    config = json.loads((engines[1] / "config.json").read_text())
    assert QuantConfig.from_dict(config["quantization"]) == FP8_PCPT
    ops = {n["inputs"][1]: n["op"] for n in config["graph"]["nodes"] if "linear" in n["op"]}
    assert ops.pop("lm_head.weight") == "linear"
    assert len(ops) == 8 and set(ops.values()) == {"fp8_linear"}
    engine = Engine.load(engines[1])
    assert engine.weights["model.layers.0.mlp.down_proj.weight"].dtype == "float8_e4m3"
    assert engine.weights["model.layers.0.mlp.down_proj.weight_scale"].dtype == "float32"


def test_quantized_engine_against_its_float64_graph(engines):
    """The whole quantized engine on the CPU runner against graph_reference run in float64."""
    rng = np.random.default_rng(1)
    engine = Engine.load(engines[1])
    for prompt in random_prompts(rng, [5, 13]):
        ours = RunnerSession(engines[1]).step({0: prompt})[0]
        expected = run_graph(engine, [prompt])[0]
        assert relative_error(ours, expected) < 1e-4


def test_quantized_logits_close_to_unquantized_and_hf(llama_dir, engines):
    """Each E4M3 rounding is off by up to 2^-4 relative (≈ 2^-4/√3 ≈ 3.6% RMS); a quantized product has two
    (weight and activation), so each fp8_linear's output is off by ≈ 5% RMS, and the tiny random model
    chains eight of them (partly averaging along the residual stream). Measured on this model over 20
    prompts: 6.5% mean, 8.3% max. The bound 0.15 leaves margin for other seeds, while a wrong scale
    (s_t or weight_scale missing or inverted) gives errors of order 1."""
    rng = np.random.default_rng(2)
    hf = load_hf_model(llama_dir)
    for prompt in random_prompts(rng, [4, 17, 30]):
        fp8 = RunnerSession(engines[1]).step({0: prompt})[0]
        ref = RunnerSession(engines[0]).step({0: prompt})[0]
        assert relative_error(fp8, ref) < 0.15
        assert relative_error(fp8, hf_last_logits(hf, prompt)) < 0.15
        assert relative_error(fp8, ref) > 1e-4  # the engine really is quantized


@pytest.mark.parametrize("exclude, kept", [
    (["*.mlp.*"], {"mlp.gate_up_proj", "mlp.down_proj"}),  # the list replaces the default: lm_head quantized
    (["model.layers.1.self_attn.qkv_proj.weight", "lm_*"], {"lm_head", "layers.1.self_attn.qkv_proj"}),
    ([], set()),
])
def test_exclude_modules_globs(llama_dir, exclude, kept):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    engine = build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
                                                                   exclude_modules=exclude))
    linears = {n["inputs"][1][:-len(".weight")]: n["op"] for n in engine.graph["nodes"] if "linear" in n["op"]}
    for module, op in linears.items():
        assert op == ("linear" if any(module.endswith(k) for k in kept) else "fp8_linear"), module


def test_lm_head_quantized_too(llama_dir, tmp_path):
    """With nothing excluded the LM head (rows: num_logits) is an fp8_linear too, and still runs."""
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
                                                           exclude_modules=[])).save(tmp_path)
    prompt = random_prompts(np.random.default_rng(3), [9])[0]
    ours = RunnerSession(tmp_path).step({0: prompt})[0]
    assert relative_error(ours, run_graph(Engine.load(tmp_path), [prompt])[0]) < 1e-4


def test_tied_embedding_stays_unquantized(tiny_model):
    model = AutoModelForCausalLM.from_hugging_face(tiny_model("llama", tie=True))
    engine = build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN",
                                                                   exclude_modules=[]))
    head = next(n for n in engine.graph["nodes"] if "model.embed_tokens.weight" in n["inputs"] and "linear" in n["op"])
    assert head["op"] == "linear" and engine.weights["model.embed_tokens.weight"].dtype == "float32"


_GREEDY = """
import sys
from rtllm import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate([[5, 6, 7, 8], [40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
print([o.outputs[0].token_ids for o in out])
"""


def test_quantize_save_load_in_a_fresh_process(llama_dir, engines):
    llm = LLM(llama_dir, quant_config=FP8_PCPT, max_seq_len=128)
    out = llm.generate([[5, 6, 7, 8], [40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    ours = [o.outputs[0].token_ids for o in out]
    fresh = subprocess.run([sys.executable, "-c", _GREEDY, str(engines[1])], capture_output=True, text=True,
                           check=True)
    assert fresh.stdout.strip() == str(ours)


@pytest.mark.parametrize("config, message", [
    (QuantConfig(quant_algo=QuantAlgo.W4A8_AWQ), "quant_algo W4A8_AWQ is not implemented yet: rtllm builds FP8, "
                                                 "FP8_PER_CHANNEL_PER_TOKEN, W8A16, W4A16"),
    (QuantConfig(quant_algo=QuantAlgo.W8A8_SQ_PER_TENSOR_PLUGIN),
     "quant_algo W8A8_SQ_PER_TENSOR_PLUGIN is not implemented"),
    (QuantConfig(quant_algo=QuantAlgo.FP8_BLOCK_SCALES), "quant_algo FP8_BLOCK_SCALES is not implemented"),
    (QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, kv_cache_quant_algo=QuantAlgo.NVFP4),
     "kv_cache_quant_algo NVFP4 is not implemented"),
])
def test_refusals(llama_dir, config, message):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    with pytest.raises(ValueError, match=message):
        build(model, BuildConfig(max_seq_len=128), config)
    with pytest.raises(ValueError, match=message):
        LLM(llama_dir, quant_config=config, max_seq_len=128)


def test_quant_config_on_a_built_engine_is_refused(engines):
    with pytest.raises(ValueError, match="quant_config is given but model=.* is a built engine"):
        LLM(str(engines[0]), quant_config=FP8_PCPT)


def test_both_readers_accept_fp8_per_channel_per_token(engines):
    assert Engine.load(engines[1]).config["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert _core.Engine.load(str(engines[1])).max_seq_len == 128
