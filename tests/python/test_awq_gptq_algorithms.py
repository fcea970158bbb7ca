"""W4A16_AWQ, W4A16_GPTQ and W8A16_GPTQ built by rtllm (calibration on rtllm's CPU runtime, then the searches in
numpy), checked against independent references:

- GPTQ alone (rtllm.quantization.gptq) on random weights and correlated inputs: valid codes and scales, and an
  output error ‖X Wᵀ − X Ŵᵀ‖ clearly below round to nearest on the same grid (RTN written here);
- the calibration statistics the runner captures (ModelRunner.capture_outputs) equal Σ|x| and XᵀX of the
  linears' inputs in HF transformers on the same calibration tokens;
- on a tiny random Llama, each quantized linear's output error on the calibration data (XᵀX from HF) is below
  RTN's for the same format (AWQ: the scale folded into the norm is divided back out);
- the engine computes the model its weights say: its decoded weights (q · scale + offset, norms as stored),
  put back into an HF checkpoint, give HF logits equal to the engine's and the same greedy tokens, after
  quantize, save and load.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from engine_fixture import RunnerSession
from hf_reference import hf_greedy, load_hf_model, random_prompts, relative_error
from rtllm import LLM, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.builder.safetensors_io import unpack_int4
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantConfig
from rtllm.quantization.calibration import calibrate, load_calib_texts, tokenize_samples
from rtllm.quantization.gptq import gptq_quantize, upper_cholesky_of_inverse

CALIB = dict(calib_size=12, calib_max_seq_length=64)


def rtn(w, bits, group, sym):
    """Round to nearest on the grid GPTQ uses (float64 reference): returns the dequantized weights."""
    N, K = w.shape
    g = w.reshape(N, K // group, group)
    if sym:
        top = 2 ** (bits - 1) - 1
        s = np.abs(g).max(axis=2, keepdims=True) / top
        s = s.astype(np.float16 if bits == 4 else np.float32).astype(np.float64)
        q = np.clip(np.rint(g / s), -top - (bits == 4), top)
        return (q * s).reshape(N, K)
    top = 2 ** bits - 1
    lo, hi = np.minimum(g.min(axis=2, keepdims=True), 0), np.maximum(g.max(axis=2, keepdims=True), 0)
    s = ((hi - lo) / top).astype(np.float16 if bits == 4 else np.float32).astype(np.float64)
    z = np.clip(np.rint(-lo / s), 0, top)
    u = np.clip(np.rint(g / s) + z, 0, top)
    return ((u - z) * s).reshape(N, K)


def out_err(x_or_h, w, w_hat, is_h=False):
    d = (w - w_hat).astype(np.float64)
    if is_h:
        return float(np.sum((d @ x_or_h) * d))
    return float(np.sum((x_or_h @ d.T) ** 2))


@pytest.mark.parametrize("bits, group, sym, desc_act", [
    (4, 32, True, False), (4, 32, False, False), (4, 64, False, True), (8, 32, True, False), (8, 128, False, True),
    (4, 128, True, True)])
def test_gptq_beats_round_to_nearest(bits, group, sym, desc_act):
    rng = np.random.default_rng(bits * 1000 + group)
    N, K, T = 96, 256, 2048
    mix = rng.standard_normal((K, K)) * 0.3 + np.eye(K)  # correlated input channels of unequal scale
    x = rng.standard_normal((T, K)) @ mix * np.exp(rng.standard_normal(K))
    w = rng.standard_normal((N, K)) * 0.05
    codes, scale, offset = gptq_quantize(w, x.T @ x, bits, group, sym, desc_act)
    assert codes.dtype == np.int8 and codes.shape == (N, K) and scale.shape == (N, K // group)
    assert scale.dtype == (np.float16 if bits == 4 else np.float32)
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    assert codes.min() >= lo and codes.max() <= hi
    assert (offset is None) == sym
    w_hat = codes * np.repeat(scale.astype(np.float64), group, axis=1)
    if offset is not None:
        w_hat += np.repeat(offset.astype(np.float64), group, axis=1)
    ours, base = out_err(x, w, w_hat), out_err(x, w, rtn(w, bits, group, sym))
    assert ours < 0.8 * base, (ours, base)


def test_upper_cholesky_of_inverse():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 70))
    h = x.T @ x
    u = upper_cholesky_of_inverse(h)
    assert np.all(np.tril(u, -1) == 0) and np.all(np.diag(u) > 0)
    np.testing.assert_allclose(u.T @ u, np.linalg.inv(h), rtol=0, atol=1e-12 * np.abs(np.linalg.inv(h)).max() * 70)


def test_gptq_refuses_bad_shapes():
    with pytest.raises(ValueError, match="K=100 is not a multiple of group_size=32"):
        gptq_quantize(np.zeros((4, 100)), np.eye(100), 4, 32, True)
    with pytest.raises(ValueError, match=r"the Hessian has shape \[8, 8\], expected \[64, 64\]"):
        gptq_quantize(np.zeros((4, 64)), np.eye(8), 4, 32, True)


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def hf_inputs(llama_dir):
    """HF inputs of each (unfused) linear on the calibration tokens: {module: [T, K] float64}."""
    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    samples = tokenize_samples(model, load_calib_texts(None), CALIB["calib_size"], CALIB["calib_max_seq_length"])
    hf = load_hf_model(llama_dir)
    seen = {}
    hooks = []
    for name, mod in hf.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0][0].double().numpy())))
    with torch.no_grad():
        for ids in samples:
            hf(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {name: np.concatenate(xs) for name, xs in seen.items()}


def test_captured_statistics_match_hf(llama_dir, hf_inputs):
    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    cal = calibrate(model, BuildConfig(max_seq_len=128).resolved(512),
                    QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, **CALIB))
    for fused, module in (("self_attn.qkv_proj", "self_attn.q_proj"), ("self_attn.o_proj", "self_attn.o_proj"),
                          ("mlp.gate_up_proj", "mlp.gate_proj"), ("mlp.down_proj", "mlp.down_proj")):
        for i in range(2):
            st = cal.input_stats[f"model.layers.{i}.{fused}.weight"]
            x = hf_inputs[f"model.layers.{i}.{module}"]
            assert st.rows == x.shape[0]
            np.testing.assert_allclose(st.abs_sum, np.abs(x).sum(0), rtol=1e-4)
            assert relative_error(st.xtx, x.T @ x) < 1e-5


def decoded(engine, name):
    """float64 q · scale + offset of the weight_only_linear reading weight `name`."""
    node = next(n for n in engine.graph["nodes"] if n["op"] == "weight_only_linear" and n["inputs"][1] == name)
    codes = engine.weights[name]
    q = unpack_int4(codes.load()) if codes.dtype == "int4" else codes.load().astype(np.int64)
    G = node["attrs"]["group_size"]
    w = q * np.repeat(engine.weights[node["inputs"][2]].load().astype(np.float64), G, axis=1)
    if node["attrs"]["has_offset"]:
        w += np.repeat(engine.weights[node["inputs"][3]].load().astype(np.float64), G, axis=1)
    return w


def float_weights(path):
    return {k: v.astype(np.float64) for k, v in load_file(os.path.join(path, "model.safetensors")).items()}


@pytest.mark.parametrize("algo, fields, rtn_fields", [
    ("W4A16_GPTQ", dict(group_size=32), dict(quant_algo="W4A16", group_size=32)),
    ("W4A16_GPTQ", dict(group_size=32, has_zero_point=True, desc_act=True),
     dict(quant_algo="W4A16", group_size=32, has_zero_point=True)),
    ("W8A16_GPTQ", dict(group_size=-1), dict(quant_algo="W8A16")),
    ("W4A16_AWQ", dict(group_size=32, has_zero_point=True), dict(quant_algo="W4A16", group_size=32,
                                                                has_zero_point=True)),
    ("W4A16_AWQ", dict(group_size=64), dict(quant_algo="W4A16", group_size=64)),
])
def test_layer_output_error_below_round_to_nearest(llama_dir, hf_inputs, algo, fields, rtn_fields):
    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    ours = build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo=algo, **fields, **CALIB))
    base = build(model, BuildConfig(max_seq_len=128), QuantConfig(**rtn_fields))
    w = float_weights(llama_dir)
    total = {"ours": 0.0, "rtn": 0.0}
    for i in range(2):
        p = f"model.layers.{i}"
        checks = [("self_attn.qkv_proj", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                   "input_layernorm"),
                  ("mlp.gate_up_proj", ["mlp.gate_proj"], "post_attention_layernorm")]
        if algo != "W4A16_AWQ":  # AWQ folds down_proj's scale into up_proj's rows (and the test model has GQA)
            checks += [("self_attn.o_proj", ["self_attn.o_proj"], None), ("mlp.down_proj", ["mlp.down_proj"], None)]
        for fused, parts, norm in checks:
            ref = np.concatenate([w[f"{p}.{m}.weight"] for m in parts])
            n = ref.shape[0]
            got, rtn_w = decoded(ours, f"{p}.{fused}.weight")[:n], decoded(base, f"{p}.{fused}.weight")[:n]
            if norm is not None and algo == "W4A16_AWQ":
                # the engine's input is X / s with s = original norm weight / engine norm weight
                s = w[f"{p}.{norm}.weight"] / ours.weights[f"{p}.{norm}.weight"].load().astype(np.float64)
                got = got / s[None, :]
            x = hf_inputs[f"{p}.{parts[0]}"]
            e_ours, e_rtn = out_err(x, ref, got), out_err(x, ref, rtn_w)
            assert e_ours <= e_rtn * 1.0001, (fused, i, e_ours, e_rtn)
            total["ours"] += e_ours
            total["rtn"] += e_rtn
    assert total["ours"] < 0.95 * total["rtn"], total


def to_hf_checkpoint(engine, src, dst):
    """The engine's model as an HF float checkpoint: decoded weights split back into q/k/v and gate/up, the
    other weights (norms, embeddings) as the engine holds them."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    hd, nh, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inter = cfg["intermediate_size"]
    for name in engine.weights:
        if name.endswith(("weight_scale", "weight_offset")) or name == "rope.inv_freq":
            continue
        is_q = any(n["op"] == "weight_only_linear" and n["inputs"][1] == name for n in engine.graph["nodes"])
        value = decoded(engine, name) if is_q else engine.weights[name].load().astype(np.float64)
        if "qkv_proj" in name:
            p = name.replace("qkv_proj.weight", "")
            for part, (a, b) in zip("qkv", ((0, nh * hd), (nh * hd, (nh + nkv) * hd),
                                             ((nh + nkv) * hd, (nh + 2 * nkv) * hd))):
                tensors[f"{p}{part}_proj.weight"] = value[a:b].astype(np.float32)
        elif "gate_up_proj" in name:
            p = name.replace("gate_up_proj.weight", "")
            tensors[f"{p}gate_proj.weight"] = value[:inter].astype(np.float32)
            tensors[f"{p}up_proj.weight"] = value[inter:].astype(np.float32)
        else:
            assert name in tensors, name
            tensors[name] = value.astype(np.float32)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


@pytest.mark.parametrize("algo, fields", [("W4A16_AWQ", dict(group_size=32, has_zero_point=True)),
                                          ("W4A16_GPTQ", dict(group_size=32, desc_act=True)),
                                          ("W8A16_GPTQ", dict(group_size=64, has_zero_point=True))])
def test_quantize_save_load_matches_hf_on_the_decoded_weights(llama_dir, tmp_path, algo, fields):
    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    engine = build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo=algo, **fields, **CALIB))
    assert engine.config["quantization"]["quant_algo"] == algo
    assert engine.quantization_report.calib_samples == CALIB["calib_size"]
    engine.save(tmp_path / "engine")
    to_hf_checkpoint(engine, llama_dir, tmp_path / "hf")
    hf = load_hf_model(tmp_path / "hf")
    for prompt in random_prompts(np.random.default_rng(5), [3, 17]):
        ours = RunnerSession(tmp_path / "engine").step({0: prompt})[0]
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert relative_error(ours, expected) < 1e-4
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(str(tmp_path / "engine"), skip_tokenizer_init=True) as llm:
        tokens = [o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [9, 10]], greedy, use_tqdm=False)]
    assert tokens == [hf_greedy(hf, [5, 6, 7], 8), hf_greedy(hf, [9, 10], 8)]


def test_one_calibration_serves_every_awq_and_gptq_config(llama_dir, tmp_path):
    """AWQ and GPTQ read the same input statistics whatever the format: builds given one calibration of the
    whole model (calibrate_whole_model, as the accuracy tests share it) write the engines that builds
    calibrating on their own write, byte for byte."""
    from rtllm.builder.build import calibrate_whole_model

    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    build_config = BuildConfig(max_seq_len=128)
    configs = [QuantConfig(quant_algo="W4A16_GPTQ", group_size=32, **CALIB),
               QuantConfig(quant_algo="W4A16_GPTQ", group_size=64, has_zero_point=True, desc_act=True, **CALIB),
               QuantConfig(quant_algo="W4A16_AWQ", group_size=32, **CALIB)]
    shared = calibrate_whole_model(model, build_config, configs[0])
    for i, quant_config in enumerate(configs):
        own, given = tmp_path / f"own{i}", tmp_path / f"given{i}"
        build(model, build_config, quant_config).save(own)
        build(model, build_config, quant_config, calibration=shared).save(given)
        for name in ("config.json", "rank0.engine"):
            assert (own / name).read_bytes() == (given / name).read_bytes(), (quant_config.quant_algo, name)


def test_bad_configs_are_refused(llama_dir):
    with pytest.raises(ValueError, match=r"group_size=-1 must be a positive integer"):
        QuantConfig(quant_algo="W4A16_AWQ", group_size=-1)
    with pytest.raises(ValueError, match=r"desc_act=True orders GPTQ's columns; quant_algo W4A16_AWQ"):
        QuantConfig(quant_algo="W4A16_AWQ", desc_act=True)
    with pytest.raises(ValueError, match=r"group_size=96 is not one of 32, 64, 128, -1"):
        QuantConfig(quant_algo="W8A16_GPTQ", group_size=96)
    model = AutoModelForCausalLM.from_hugging_face(str(llama_dir))
    # intermediate 128: down_proj's K=128 is fine, hidden 64 is not a multiple of 128
    with pytest.raises(ValueError, match=r"W4A16_GPTQ: linear 'model.layers.0.self_attn.qkv_proj' has K=64 input "
                                         r"features, not a multiple of group_size=128"):
        build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="W4A16_GPTQ", group_size=128, **CALIB))


def test_cli_builds_awq_and_gptq(llama_dir, tmp_path):
    """`rtllm build --quant-algo w4a16_awq|w4a16_gptq` (case-insensitive) with the calibration flags."""
    import subprocess
    import sys

    for algo, extra in (("w4a16_awq", ["--has-zero-point"]), ("w4a16_gptq", ["--desc-act"])):
        out = tmp_path / algo
        subprocess.run([sys.executable, "-m", "rtllm.cli", "build", str(llama_dir), "-o", str(out), "--quant-algo",
                        algo, "--group-size", "32", "--calib-size", "4", *extra], check=True, capture_output=True,
                       timeout=600)
        q = json.loads((out / "config.json").read_text())["quantization"]
        assert q["quant_algo"] == algo.upper() and q["group_size"] == 32 and q["calib_size"] == 4
        assert q["has_zero_point"] == (algo == "w4a16_awq") and q["desc_act"] == (algo == "w4a16_gptq")
