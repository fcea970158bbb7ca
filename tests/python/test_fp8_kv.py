"""An FP8 (E4M3) KV cache on the CPU: the runner with kv_cache_dtype F8_E4M3 against a float64 reference
whose K (after qk_norm and RoPE) and V are rounded to E4M3 (graph_reference.e4m3, torch's rounding,
saturated), the pool's size, engines built with kv_cache_quant_algo FP8 (through LLM, against the
unquantized engine, saved and loaded), prefix reuse and block copies over an FP8 pool, and the refusals."""
import json
import subprocess
import sys

import numpy as np
import pytest

import rtllm
from engine_fixture import (RunnerSession, TinyModel, assert_prefix_reuse_reproduces, build_engine_dirs,
                            random_tokens, reference_logits, write_engine)
from graph_reference import e4m3
from hf_reference import random_prompts, relative_error
from rtllm import LLM, BuildConfig, SamplingParams, _core
from rtllm.builder import build
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantAlgo, QuantConfig

FP8_KV = QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8)
GREEDY = dict(temperature=0.0, ignore_eos=True)

# The runner and the reference hold the same E4M3 K/V values (decoding is exact), so what remains is
# float32 arithmetic against float64, as for an F32 cache: test_model_runner's RTOL (measured here:
# <= 5.2e-7). This assumes the float32 and float64 K/V round to the same E4M3 values; an element whose
# two values straddle a rounding boundary (odds ~1e-5 each, none for these seeds, deterministic) would
# show as a ~1e-3 error. A missing or wrong rounding of K or V is off by >= 6e-3 (checked below, so this
# test can fail).
RTOL = 1e-5


def max_relative(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def test_e4m3_reference_matches_rtllms_conversion():
    """The reference's rounding (torch, clipped) is rtllm's own float_to_fp8_e4m3, ties and saturation
    included, so the K/V the reference uses are the values the pool stores."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=4000) * np.exp2(rng.uniform(-12, 10, 4000)),
                        [0.0, -0.0, 448.0, 464.0, 1e6, -1e6, 2.0 ** -9, 2.0 ** -10, 1.0625, 1.1875]])
    x32 = x.astype(np.float32)
    codes = np.asarray(_core.convert_floats(x32.view(np.uint8), "F32", "F8_E4M3"), np.uint8)
    decoded = np.asarray(_core.convert_floats(codes, "F8_E4M3", "F32"), np.uint8).view(np.float32)
    np.testing.assert_array_equal(decoded, e4m3(x32))


@pytest.mark.parametrize("fields, fused", [
    (dict(), True),                                   # head_dim 16: the kernel's generic p·v loop
    (dict(head_dim=32, qk_norm=True), True),          # qk_norm + RoPE inside attention, the 8-lane p·v
    (dict(num_heads=8, num_kv_heads=2), False),       # standalone rope op, group of 4 q heads
])
def test_runner_fp8_kv_against_float64(tmp_path, fields, fused):
    """Several sequences (prompts across key blocks of 32 and pages of 4), shuffled blocks, then
    multi-step decode with all sequences in one step."""
    m = TinyModel(**fields)
    path = write_engine(tmp_path / "e", m, fused=fused)
    session = RunnerSession(path, tokens_per_block=4, num_kv_blocks=128, kv_cache_dtype="F8_E4M3")
    assert session.runner.config.kv_cache_dtype == "F8_E4M3"
    rng = np.random.default_rng(len(fields))
    prompts = {0: random_tokens(rng, m, 37), 1: random_tokens(rng, m, 5), 2: random_tokens(rng, m, 70)}
    out = session.step(prompts)
    unquantized_error = []
    for step in range(5):
        for s, logits in out.items():
            tokens = session.tokens[s]
            expected = reference_logits(m, tokens, kv_round=e4m3)[-1]
            assert max_relative(logits, expected) <= RTOL, (step, s)
            unquantized_error.append(max_relative(logits, reference_logits(m, tokens)[-1]))
        out = session.step({s: random_tokens(rng, m, 1) for s in prompts})
    # The pool really is E4M3: against the unquantized model the error is that of the rounding.
    assert min(unquantized_error) > 10 * RTOL


def test_fp8_pool_is_a_quarter_of_f32(tmp_path):
    m = TinyModel()
    engine = _core.Engine.load(str(write_engine(tmp_path / "e", m)))
    sizes = {}
    for dtype in ("F32", "F8_E4M3"):
        runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=40, tokens_per_block=16,
                                                               kv_cache_dtype=dtype))
        sizes[dtype] = runner.kv_pool_bytes
    assert sizes["F32"] == 40 * m.num_layers * 2 * m.num_kv_heads * 16 * m.head_dim * 4
    assert sizes["F8_E4M3"] * 4 == sizes["F32"]


def test_copy_blocks_with_an_fp8_pool(tmp_path):
    """A sequence sharing 6 tokens (a full block and 2 of the next) with a cached one reads its own copy
    of the partial block: copy_blocks moves E4M3 bytes, and the result is the reference's."""
    m = TinyModel(num_layers=3)
    engine = _core.Engine.load(str(write_engine(tmp_path / "engine", m)))
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(tokens_per_block=4, num_kv_blocks=16,
                                                           kv_cache_dtype="F8_E4M3"))
    rng = np.random.default_rng(13)
    a = random_tokens(rng, m, 10)
    b = a[:6] + random_tokens(rng, m, 5)
    table = lambda *ids: np.array([ids], dtype=np.int32)  # noqa: E731
    runner.forward(a, [10], [0], table(3, 7, 11))
    runner.copy_blocks([(7, 5)])
    out = runner.forward(b[6:], [5], [6], table(3, 5, 9))
    assert max_relative(out[0], reference_logits(m, b, kv_round=e4m3)[-1]) <= RTOL
    # Without the copy the same step reads other K/V: the check above can fail.
    stale = runner.forward(b[6:], [5], [6], table(3, 13, 9))
    assert not np.all(np.isfinite(stale)) or max_relative(stale[0], reference_logits(m, b, kv_round=e4m3)[-1]) > 1e-3
    out = runner.forward([a[-1]], [1], [10], table(3, 7, 11))  # a's block 7 kept a's tokens
    assert max_relative(out[0], reference_logits(m, a + [a[-1]], kv_round=e4m3)[-1]) <= RTOL


# ---------------------------------------------------------------- engines built with kv_cache_quant_algo FP8


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def engines(llama_dir, tmp_path_factory):
    """(unquantized, FP8 KV) engine dirs of the tiny HF llama."""
    return build_engine_dirs(llama_dir, tmp_path_factory, (("plain", None), ("fp8kv", FP8_KV)))


def test_engine_records_the_kv_algorithm_and_the_runner_follows_it(engines):
    config = json.loads((engines[1] / "config.json").read_text())
    assert config["quantization"]["kv_cache_quant_algo"] == "FP8"
    # the graph is unchanged but for each attention node's calibrated k_scale / v_scale
    graph = config["graph"]
    scales = [(n["attrs"].pop("k_scale"), n["attrs"].pop("v_scale")) for n in graph["nodes"] if n["op"] == "attention"]
    assert len(scales) == 2 and all(0 < s < 1 for pair in scales for s in pair)
    assert graph == json.loads((engines[0] / "config.json").read_text())["graph"]
    engine = _core.Engine.load(str(engines[1]))
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=8))
    assert runner.config.kv_cache_dtype == "F8_E4M3"
    assert _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=8, kv_cache_dtype="F8_E4M3")) \
        .config.kv_cache_dtype == "F8_E4M3"
    with pytest.raises(ValueError, match="kv_cache_dtype F32 contradicts the engine's kv_cache_quant_algo FP8, "
                                         "which stores the KV cache as F8_E4M3"):
        _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=8, kv_cache_dtype="F32"))


def test_fp8_kv_engine_logits_close_to_unquantized(engines):
    """Only K and V are rounded (2^-4 relative at most, ≈ 3.6% RMS per element); attention averages
    over many values and the residual stream carries the rest unquantized, so the logits move by a few
    percent. Measured on this model over 30 prompts of 5, 29 and 70 tokens: 1.7% mean, 3.1% max
    (relative L2). The bound 0.08 leaves margin, while a misread pool (wrong dtype, wrong rows) gives
    errors of order 1; the lower bound shows the cache really is quantized."""
    rng = np.random.default_rng(4)
    for prompt in random_prompts(rng, [5, 29, 70]):
        fp8 = RunnerSession(engines[1]).step({0: prompt})[0]
        ref = RunnerSession(engines[0]).step({0: prompt})[0]
        assert 1e-5 < relative_error(fp8, ref) < 0.08


_GREEDY = """
import sys
from rtllm import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate([[5, 6, 7, 8], [40, 41]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
print([o.outputs[0].token_ids for o in out])
"""


def test_llm_generate_and_save_load_round_trip(llama_dir, engines):
    """LLM(quant_config=) builds an FP8-KV engine; its greedy tokens match those of the saved engine run
    in a fresh process, and the engine the LLM built (in memory) keeps the KV algorithm."""
    prompts = [[5, 6, 7, 8], [40, 41]]
    with LLM(llama_dir, quant_config=FP8_KV, max_seq_len=128) as llm:
        out = llm.generate(prompts, SamplingParams(max_tokens=12, **GREEDY))
        ours = [o.outputs[0].token_ids for o in out]
        assert json.loads(llm._engine.config_json)["quantization"]["kv_cache_quant_algo"] == "FP8"
    fresh = subprocess.run([sys.executable, "-c", _GREEDY, str(engines[1])], capture_output=True, text=True,
                           check=True)
    assert fresh.stdout.strip() == str(ours)


def test_prefix_reuse_with_an_fp8_pool(engines):
    """Prefix reuse on an FP8 (E4M3) pool reproduces the request run alone (engine_fixture)."""
    assert_prefix_reuse_reproduces(engines[1])


@pytest.mark.parametrize("config, message", [
    (QuantConfig(kv_cache_quant_algo=QuantAlgo.NVFP4), "kv_cache_quant_algo NVFP4 is not implemented yet"),
    (QuantConfig(quant_algo=QuantAlgo.FP8_BLOCK_SCALES, kv_cache_quant_algo=QuantAlgo.FP8),
     "quant_algo FP8_BLOCK_SCALES is not implemented"),
])
def test_other_kv_algorithms_are_refused(llama_dir, config, message):
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    with pytest.raises(ValueError, match=message):
        build(model, BuildConfig(max_seq_len=128), config)
    with pytest.raises(ValueError, match=message):
        LLM(llama_dir, quant_config=config, max_seq_len=128)


def test_fp8_kv_with_fp8_weights(llama_dir, tmp_path):
    """Both FP8 algorithms together build and load; the runner picks the E4M3 pool."""
    model = AutoModelForCausalLM.from_hugging_face(llama_dir)
    quant = QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, kv_cache_quant_algo=QuantAlgo.FP8)
    build(model, BuildConfig(max_seq_len=128), quant).save(tmp_path)
    session = RunnerSession(tmp_path)
    assert session.runner.config.kv_cache_dtype == "F8_E4M3"
    assert np.isfinite(session.step({0: [5, 6, 7]})[0]).all()


def test_c_reader_refuses_nvfp4_kv(engines, tmp_path):
    config = json.loads((engines[0] / "config.json").read_text())
    config["quantization"]["kv_cache_quant_algo"] = "NVFP4"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "rank0.engine").symlink_to(engines[0] / "rank0.engine")
    with pytest.raises(rtllm.RtllmError, match="kv_cache_quant_algo NVFP4 is not supported: this rtllm stores the KV "
                                                "cache unquantized, as FP8 or as INT8"):
        _core.Engine.load(str(tmp_path))
