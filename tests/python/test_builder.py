"""The builder against HF transformers: engine graphs (run by the float64 graph reference) must give
HF's float32 logits, fused or not, for every architecture, dtype and embedding tying."""

import collections
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from graph_reference import run_graph
from hf_reference import ARCHITECTURES, hf_last_logits, hf_tensor, load_hf_model, random_prompts, relative_error
from rtllm.builder import BuildConfig, Engine, build, passes
from rtllm.builder.build import trace
from rtllm.models import AutoModelForCausalLM, LlamaForCausalLM, ModelConfig

# Lengths include one past the llama3 scaling's original 64 positions, so every rope band matters.
PROMPT_LENGTHS = [1, 7, 33, 150]
TOLERANCE = 1e-4  # float32 HF vs float64 reference; observed ~3e-7


def _prompts(seed=0):
    return random_prompts(np.random.default_rng(seed), PROMPT_LENGTHS)


def _hf_logits(path, prompts):
    model = load_hf_model(str(path))
    return np.stack([hf_last_logits(model, p) for p in prompts])


def _check_graph_wellformed(engine):
    """Every input is defined before use, every output is declared in tensors, weights exist."""
    graph = engine.graph
    defined = {t["name"] for t in graph["inputs"]}
    declared = {t["name"]: t for t in graph["tensors"]}
    for node in graph["nodes"]:
        for name in node["inputs"]:
            assert name in defined or name in engine.weights, f"{node['op']} reads undefined {name}"
        for name in node["outputs"]:
            assert name in declared and name not in defined
            defined.add(name)
    assert [t["name"] for t in graph["outputs"]] == ["logits"]
    assert graph["outputs"][0]["shape"] == ["num_logits", engine.model_config["vocab_size"]]
    used = {i for node in graph["nodes"] for i in node["inputs"]}
    assert set(engine.weights) <= used, "engine stores weights the graph never reads"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_logits_match_hf(tiny_model, arch, tie, dtype):
    path = tiny_model(arch, dtype, tie)
    prompts = _prompts()
    expected = _hf_logits(path, prompts)
    for fuse in (False, True):
        engine = build(AutoModelForCausalLM.from_hugging_face(path), BuildConfig(fuse=fuse))
        _check_graph_wellformed(engine)
        assert engine.model_config["dtype"] == dtype
        actual = run_graph(engine, prompts)  # all prompts packed into one step
        for i, length in enumerate(PROMPT_LENGTHS):
            err = relative_error(actual[i], expected[i])
            assert err < TOLERANCE, f"{arch} tie={tie} {dtype} fuse={fuse} prompt length {length}: error {err}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_build_casts_weights_like_torch(tiny_model, dtype):
    """A float32 checkpoint built in bf16/fp16: weights equal torch's rounding bit for bit and logits
    match HF running those rounded weights."""
    path = tiny_model("qwen2", "float32")
    engine = build(AutoModelForCausalLM.from_hugging_face(path), BuildConfig(dtype=dtype, fuse=False))
    hf = load_hf_model(str(path))
    torch_dtype = getattr(torch, dtype)
    hf_params = dict(hf.named_parameters())
    for name, weight in engine.weights.items():
        if name == "rope.inv_freq":
            assert weight.dtype == "float32"
            continue
        assert weight.dtype == dtype
        rounded = hf_tensor(hf_params, name).detach().to(torch_dtype)
        bits = rounded.view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(weight.load().view(np.uint16), bits, err_msg=name)
    with torch.no_grad():  # round the parameters only (model.to() would round HF's rope buffer too)
        for p in hf.parameters():
            p.copy_(p.to(torch_dtype).to(torch.float32))
    prompts = _prompts(1)
    expected = np.stack([hf_last_logits(hf, p) for p in prompts])
    assert relative_error(run_graph(engine, prompts), expected) < TOLERANCE


def test_from_hugging_face_dtype_override(tiny_model):
    path = tiny_model("llama", "bfloat16")
    model = AutoModelForCausalLM.from_hugging_face(path, dtype="float32")
    engine = build(model)
    assert engine.model_config["dtype"] == "float32"
    assert all(w.dtype == "float32" for w in engine.weights.values())
    prompts = _prompts(2)
    assert relative_error(run_graph(engine, prompts), _hf_logits(path, prompts)) < TOLERANCE


def test_llama3_inv_freq_matches_hf(tiny_model):
    path = tiny_model("llama3")
    model = AutoModelForCausalLM.from_hugging_face(path)
    hf_config = load_hf_model(str(path)).config
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    actual = model.config.rope_inv_freq()
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-6)
    default = 1.0 / 500000.0 ** (np.arange(0, 16, 2) / 16)
    assert not np.allclose(actual, default, rtol=1e-3), "scaling changed nothing: test would not catch errors"


def _ops(engine):
    return collections.Counter(node["op"] for node in engine.graph["nodes"])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_fused_graph_ops_and_weights(tiny_model, arch):
    path = tiny_model(arch)
    model = AutoModelForCausalLM.from_hugging_face(path)
    num_layers = model.config.num_layers
    fused, unfused = build(model, BuildConfig(fuse=True)), build(model, BuildConfig(fuse=False))
    # the layers emit fused qkv / gate_up linears, RoPE and q/k norm inside attention, and silu_mul; the
    # pass fuses each residual add with the next norm
    assert _ops(unfused) == collections.Counter(
        embedding=1, rms_norm=2 * num_layers + 1, linear=4 * num_layers + 1, attention=num_layers,
        add=2 * num_layers, silu_mul=num_layers, gather_rows=1)
    assert _ops(fused) == collections.Counter(
        embedding=1, rms_norm=1, add_rms_norm=2 * num_layers, linear=4 * num_layers + 1, attention=num_layers,
        silu_mul=num_layers, gather_rows=1)
    for node in fused.graph["nodes"]:
        if node["op"] == "attention":
            a = node["attrs"]
            assert a["fused_qkv"] and a["rope"] and a["qk_norm"] == model.config.qk_norm
            assert node["inputs"][1:3] == ["positions", "rope.inv_freq"]
            assert len(node["inputs"]) == 3 + 2 * model.config.qk_norm

    # stacked weights hold the checkpoint's tensors, rows in HF order
    checkpoint = load_file(str(path / "model.safetensors"))
    stacked = [n for n in fused.weights if ".qkv_proj." in n or ".gate_up_proj." in n]
    assert len(stacked) == num_layers * (3 if arch == "qwen2" else 2)
    for name in fused.weights:
        if name != "rope.inv_freq":
            np.testing.assert_array_equal(fused.weights[name].load(), hf_tensor(checkpoint, name).numpy(),
                                          err_msg=name)
    assert not any(part in name for name in fused.weights for part in ("q_proj", "k_proj", "gate_proj"))


@pytest.mark.parametrize("tie", [False, True])
def test_tied_embeddings_stored_once(tiny_model, tmp_path, tie):
    path = tiny_model("llama", "float32", tie)
    engine = build(AutoModelForCausalLM.from_hugging_face(path))
    head = engine.graph["nodes"][-1]
    assert head["op"] == "linear" and head["outputs"] == ["logits"]
    assert head["inputs"][1] == ("model.embed_tokens.weight" if tie else "lm_head.weight")
    assert ("lm_head.weight" in engine.weights) == (not tie)
    engine.save(tmp_path / "engine")
    with safe_open(str(tmp_path / "engine" / "rank0.engine"), framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)


def test_add_rms_norm_pass_keeps_semantics(tiny_model):
    model = AutoModelForCausalLM.from_hugging_face(tiny_model("qwen3"))
    network = trace(model)
    reference = Engine({"model_config": model.config.to_json(), "graph": network.to_json()}, dict(network.weights))
    passes.fuse_add_rms_norm(network)
    network.prune()
    rewritten = Engine({"model_config": model.config.to_json(), "graph": network.to_json()}, dict(network.weights))
    ops = _ops(rewritten)
    assert ops["add_rms_norm"] == 2 * model.config.num_layers and ops["add"] == 0
    prompts = _prompts(3)
    np.testing.assert_allclose(run_graph(rewritten, prompts), run_graph(reference, prompts), rtol=1e-9, atol=1e-9)


@st.composite
def _model_configs(draw):
    num_kv_heads = draw(st.integers(1, 3))
    num_heads = num_kv_heads * draw(st.integers(1, 3))
    head_dim = 2 * draw(st.integers(1, 8))
    bias = draw(st.booleans())
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=draw(st.integers(2, 40)), hidden_size=draw(st.integers(1, 24)),
        num_layers=draw(st.integers(1, 3)), num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
        intermediate_size=draw(st.integers(1, 20)), max_position_embeddings=64,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-2])), rope_theta=draw(st.sampled_from([100.0, 1e4])),
        rope_scaling=None, tie_word_embeddings=draw(st.booleans()), attention_bias=bias,
        o_bias=bias and draw(st.booleans()), qk_norm=draw(st.booleans()), dtype="float32", bos_token_id=-1,
        eos_token_id=[])


@settings(max_examples=25, deadline=None)
@given(config=_model_configs(), seed=st.integers(0, 2 ** 16), lengths=st.lists(st.integers(1, 9), min_size=1,
                                                                                max_size=4))
def test_fusion_keeps_semantics_for_any_shape(config, seed, lengths):
    """Fused and unfused graphs of random model shapes (GQA ratios, biases, qk norm, tying) agree."""
    model = LlamaForCausalLM(config)
    rng = np.random.default_rng(seed)
    for name, param in model.named_parameters():
        if param.loader is None:
            values = rng.standard_normal(param.shape).astype(np.float32) * 0.3 + name.endswith("norm.weight")
            param.loader = lambda values=values: values
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]
    fused, unfused = build(model, BuildConfig(fuse=True)), build(model, BuildConfig(fuse=False))
    _check_graph_wellformed(fused)
    assert _ops(fused)["add"] == 0 and _ops(fused)["rms_norm"] == 1 and _ops(unfused)["add"] == 2 * config.num_layers
    np.testing.assert_allclose(run_graph(fused, prompts), run_graph(unfused, prompts), rtol=1e-9, atol=1e-9)


def test_save_load_round_trip(tiny_model, tmp_path):
    path = tiny_model("qwen2", "bfloat16", True)
    engine = build(AutoModelForCausalLM.from_hugging_face(path), BuildConfig(max_batch_size=8, max_seq_len=256))
    engine.save(tmp_path / "engine")
    loaded = Engine.load(tmp_path / "engine")
    assert loaded.config == json.loads(json.dumps(engine.config))
    with open(tmp_path / "engine" / "config.json") as f:
        assert json.load(f) == loaded.config
    assert loaded.config["build_config"] == {"max_batch_size": 8, "max_input_len": 256, "max_seq_len": 256,
                                             "max_num_tokens": 8192, "fuse": True}
    assert list(loaded.weights) != [] and set(loaded.weights) == set(engine.weights)
    with safe_open(str(tmp_path / "engine" / "rank0.engine"), framework="pt") as f:  # readable by safetensors
        for name, weight in engine.weights.items():
            expected = weight.load()
            np.testing.assert_array_equal(loaded.weights[name].load(), expected)
            assert loaded.weights[name].dtype == weight.dtype
            stored = f.get_tensor(name)
            assert str(stored.dtype) == f"torch.{weight.dtype}"
            np.testing.assert_array_equal(stored.view(torch.int16 if weight.dtype == "bfloat16" else stored.dtype)
                                          .numpy().view(expected.dtype), expected)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "engine" / name).read_bytes() == (path / name).read_bytes()
    prompts = _prompts(4)
    np.testing.assert_array_equal(run_graph(loaded, prompts), run_graph(engine, prompts))
    loaded.save(tmp_path / "copy")  # a loaded engine saves again, tokenizer files included
    assert (tmp_path / "copy" / "rank0.engine").read_bytes() == (tmp_path / "engine" / "rank0.engine").read_bytes()
    assert (tmp_path / "copy" / "tokenizer.json").exists()


def test_engine_data_is_aligned(tiny_model, tmp_path):
    """Each tensor starts at a multiple of its element size, so the runtime can use it in place."""
    engine = build(AutoModelForCausalLM.from_hugging_face(tiny_model("llama", "bfloat16")))
    engine.save(tmp_path)
    data = (tmp_path / "rank0.engine").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(data[8:8 + header_len])
    sizes = {"F32": 4, "BF16": 2}
    for name, entry in header.items():
        if name != "__metadata__":
            assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0, name


def test_load_rejects_other_format_version(tiny_model, tmp_path):
    build(AutoModelForCausalLM.from_hugging_face(tiny_model("llama"))).save(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["format_version"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="engine format version 3 is not readable; this rtllm reads versions 1 to 2"):
        Engine.load(tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        Engine.load(tmp_path / "nowhere")


def test_save_refuses_source_dir(tiny_model, tmp_path):
    path = tiny_model("llama")
    engine = build(AutoModelForCausalLM.from_hugging_face(path))
    with pytest.raises(ValueError, match="cannot save an engine into .*, the directory it is read from"):
        engine.save(path)
    engine.save(tmp_path)
    with pytest.raises(ValueError, match="the directory it is read from"):
        Engine.load(tmp_path).save(tmp_path)
