"""Pre-quantized FP8 checkpoints (compressed-tensors and ModelOpt layouts): written here from a tiny random
HF checkpoint, with the weights quantized in numpy/torch independently of rtllm, then loaded by rtllm.

- per-channel weights + dynamic per-token activations: the engine equals rtllm's own
  FP8_PER_CHANNEL_PER_TOKEN quantization of the unquantized checkpoint (same codes, scales, logits, tokens);
- per-tensor weights + dynamic activations: per-token mode with each part's scale over its rows;
- static per-tensor: the fp8_linear nodes carry the checkpoint's codes and scales after the fused-part
  unification (computed here with torch), the attention nodes its k/v scales, and the output matches HF
  transformers running the same fake-quantized model;
- every unsupported variant is refused naming the value."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import graph_reference
from engine_fixture import RunnerSession
from hf_reference import load_hf_model, random_prompts, relative_error
from rtllm import LLM, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
FUSED = {"self_attn.q_proj": "qkv", "self_attn.k_proj": "qkv", "self_attn.v_proj": "qkv",
         "mlp.gate_proj": "gate_up", "mlp.up_proj": "gate_up"}
F8 = torch.float8_e4m3fn


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """float32 -> E4M3, rounded to nearest even (torch's cast) and saturated to ±448 (the clamp: amax / 448
    as the scale can leave w / scale a float32 ulp above 448)."""
    return x.to(torch.float32).clamp(-448, 448).to(F8)


def ct_config(weights="channel", acts="token", kv=False, **extra):
    """A compressed-tensors quantization_config as llm-compressor writes it."""
    w = {"num_bits": 8, "type": "float", "strategy": weights, "symmetric": True, "dynamic": False}
    a = {"num_bits": 8, "type": "float", "strategy": acts, "symmetric": True, "dynamic": acts == "token"}
    q = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": w, "input_activations": a}},
         "ignore": ["lm_head"], "kv_cache_scheme": None}
    if kv:
        q["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False,
                                "symmetric": True}
    q.update(extra)
    return q


def write_prequantized(src, dst, layout, weights="channel", acts="token", kv=False, seed=0):
    """Copies checkpoint `src` to `dst` with every decoder linear stored in FP8 (lm_head kept) in
    `layout` ("compressed-tensors" or "modelopt"). Returns {hf module name: dict(codes, scale, input_scale)}
    and the k/v scales {layer: (k, v)} written."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    num_layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    rng = np.random.default_rng(seed)
    calib = calibrate(src, num_layers) if acts == "tensor" else {}
    written, kv_scales = {}, {}
    for i in range(num_layers):
        for leaf in LINEARS:
            m = f"model.layers.{i}.{leaf}"
            w = tensors.pop(f"{m}.weight").to(torch.float32)
            if weights == "channel":
                scale = w.abs().amax(dim=1, keepdim=True) / 448  # [N, 1]
            else:
                scale = (w.abs().amax() / 448).reshape(())  # a scalar
            # each part gets its own scale: fused parts then differ (unification is exercised)
            codes = e4m3(w / scale)
            entry = dict(codes=codes, scale=scale)
            tensors[f"{m}.weight"] = codes
            tensors[f"{m}.weight_scale"] = scale if layout == "compressed-tensors" or weights == "tensor" \
                else scale.reshape(-1)  # ModelOpt per-channel: [N]
            if acts == "tensor":
                # calibrated amax / 448, times a factor that makes the fused parts' scales differ
                entry["input_scale"] = torch.tensor(calib[m] / 448 * rng.uniform(1.0, 1.5), dtype=torch.float32)
                tensors[f"{m}.input_scale"] = entry["input_scale"].reshape([1] if layout == "modelopt" else [])
            written[m] = entry
        if kv:
            k, v = (torch.tensor(rng.uniform(0.01, 0.05), dtype=torch.float32) for _ in range(2))
            kv_scales[i] = (float(k), float(v))
            attn = f"model.layers.{i}.self_attn"
            names = (f"{attn}.k_scale", f"{attn}.v_scale") if layout == "compressed-tensors" else \
                (f"{attn}.k_proj.k_scale", f"{attn}.v_proj.v_scale")
            tensors[names[0]], tensors[names[1]] = k.reshape(()), v.reshape(())
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if layout == "compressed-tensors":
        config["quantization_config"] = ct_config(weights, acts, kv)
    else:
        algo = "FP8" if acts == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
        with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
            json.dump({"producer": {"name": "modelopt", "version": "0.0"},
                       "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv else None,
                                        "exclude_modules": ["lm_head"]}}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return written, kv_scales


def calibrate(src, num_layers) -> dict:
    """amax |x| at each decoder linear's input over a few random prompts (HF transformers, float32)."""
    model = load_hf_model(src)
    amax, hooks = {}, []
    for name, mod in model.named_modules():
        if any(name.endswith(leaf) for leaf in LINEARS):
            def hook(mod, inp, name=name):
                amax[name] = max(amax.get(name, 0.0), float(inp[0].abs().max()))
            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for p in random_prompts(np.random.default_rng(9), [12, 30]):
            model(torch.tensor([p]))
    for h in hooks:
        h.remove()
    return amax


def unified_parts(written, layer, group) -> tuple:
    """({hf module: codes uint8}, weight scale, input scale) that a static fused linear ("qkv" or "gate_up")
    must hold: each part dequantized with its scale and re-quantized with the largest (float32 arithmetic;
    kept as is when its scale is the largest); the input scale is the largest of the parts'."""
    parts = [f"model.layers.{layer}.{leaf}" for leaf, g in FUSED.items() if g == group]
    top = np.float32(max(float(written[p]["scale"]) for p in parts))
    codes = {}
    for p in parts:
        c, s = written[p]["codes"], np.float32(written[p]["scale"])
        codes[p] = c if s == top else e4m3(c.to(torch.float32) * torch.tensor(s) / torch.tensor(top))
        codes[p] = codes[p].view(torch.uint8).numpy()
    input_scale = np.float32(max(float(written[p]["input_scale"]) for p in parts))
    return codes, top, input_scale


def unified(written, layer, group) -> tuple:
    """(fused codes [sum N, K], weight scale, input scale) of unified_parts."""
    codes, top, input_scale = unified_parts(written, layer, group)
    return np.concatenate(list(codes.values())), top, input_scale


def fake_quant_hf(src, written, acts, effective):
    """HF transformers model of `src` with each decoder linear's weight replaced by its FP8 value (codes ·
    scale from `effective(module)`) and its input quantized as the engine does (per token, or statically)."""
    model = load_hf_model(src)
    for name, mod in model.named_modules():
        if name not in written:
            continue
        codes, scale, input_scale = effective(name)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(codes).view(F8).to(torch.float32) * torch.as_tensor(scale))

        def hook(mod, inp, input_scale=input_scale):
            x = inp[0].to(torch.float32)
            if acts == "token":
                s = (x.abs().amax(dim=-1, keepdim=True) / 448).clamp(min=torch.finfo(torch.float32).tiny)
            else:
                s = torch.tensor(input_scale)
            q = (x / s).clamp(-448, 448).to(F8).to(torch.float32)
            return (q * s,)
        mod.register_forward_pre_hook(hook)
    return model


def engine_of(checkpoint, quant_config=None):
    return build(AutoModelForCausalLM.from_hugging_face(checkpoint), BuildConfig(max_seq_len=128), quant_config)


def linear_nodes(engine) -> dict:
    return {n["inputs"][1].rsplit(".", 1)[0]: n for n in engine.graph["nodes"] if "linear" in n["op"]}


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_per_channel_dynamic_equals_rtllm_quantization(llama_dir, tmp_path, layout):
    ckpt = tmp_path / "ckpt"
    write_prequantized(llama_dir, ckpt, layout, weights="channel", acts="token")
    loaded = engine_of(ckpt)
    own = engine_of(llama_dir, QuantConfig(quant_algo="FP8_PER_CHANNEL_PER_TOKEN"))
    assert loaded.config["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    assert loaded.config["quantization"]["kv_cache_quant_algo"] is None
    assert loaded.graph["nodes"] == own.graph["nodes"]
    assert set(loaded.weights) == set(own.weights)
    for name, weight in own.weights.items():
        assert loaded.weights[name].dtype == weight.dtype, name
        np.testing.assert_array_equal(loaded.weights[name].load(), weight.load(), err_msg=name)
    loaded.save(tmp_path / "loaded")
    own.save(tmp_path / "own")
    for prompt in random_prompts(np.random.default_rng(1), [5, 23]):
        a = RunnerSession(tmp_path / "loaded").step({0: prompt})[0]
        b = RunnerSession(tmp_path / "own").step({0: prompt})[0]
        np.testing.assert_array_equal(a, b)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    tokens = []
    for path in (ckpt, tmp_path / "own"):
        with LLM(str(path), skip_tokenizer_init=True, max_seq_len=128) as llm:
            tokens.append([o.outputs[0].token_ids for o in llm.generate([[5, 6, 7], [40, 41, 42, 43]], greedy,
                                                                        use_tqdm=False)])
    assert tokens[0] == tokens[1]


def test_per_tensor_weights_dynamic_activations(llama_dir, tmp_path):
    """Per-tensor weight scales with dynamic per-token activations: per_token mode, each fused part's scale
    repeated over its rows, codes as stored; the output matches HF running the same FP8 model."""
    ckpt = tmp_path / "ckpt"
    written, _ = write_prequantized(llama_dir, ckpt, "compressed-tensors", weights="tensor", acts="token")
    engine = engine_of(ckpt)
    nodes = linear_nodes(engine)
    for i in range(2):
        for module, parts in ((f"model.layers.{i}.self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                              (f"model.layers.{i}.mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            node = nodes[module]
            assert node["op"] == "fp8_linear" and node["attrs"].get("activation_scaling", "per_token") == "per_token"
            hf = [written[f"{module.rsplit('.', 1)[0]}.{p}"] for p in parts]
            expected_scale = np.concatenate([np.full(e["codes"].shape[0], float(e["scale"]), np.float32) for e in hf])
            np.testing.assert_array_equal(engine.weights[node["inputs"][2]].load(), expected_scale)
            np.testing.assert_array_equal(engine.weights[node["inputs"][1]].load(),
                                          torch.cat([e["codes"] for e in hf]).view(torch.uint8).numpy())
    engine.save(tmp_path / "engine")
    hf = fake_quant_hf(llama_dir, written, "token", lambda m: (written[m]["codes"].view(torch.uint8).numpy(),
                                                               written[m]["scale"], None))
    for prompt in random_prompts(np.random.default_rng(2), [4, 19]):
        ours = RunnerSession(tmp_path / "engine").step({0: prompt})[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        # same quantization on both sides; only float32 rounding differs (measured 3e-7; a rare E4M3 rounding
        # flip could add ~1e-4), while the FP8 model is 6-7% away from the unquantized one
        assert relative_error(ours, ref) < 1e-3


@pytest.fixture(scope="module", params=["compressed-tensors", "modelopt"])
def static_checkpoint(request, llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("static") / request.param
    written, kv_scales = write_prequantized(llama_dir, path, request.param, weights="tensor", acts="tensor", kv=True)
    return path, written, kv_scales


def test_static_nodes_carry_the_checkpoint_scales(static_checkpoint):
    ckpt, written, kv_scales = static_checkpoint
    engine = engine_of(ckpt)
    q = engine.config["quantization"]
    assert (q["quant_algo"], q["kv_cache_quant_algo"], q["exclude_modules"]) == ("FP8", "FP8", ["lm_head"])
    nodes = linear_nodes(engine)
    assert nodes["lm_head"]["op"] == "linear"
    for i in range(2):
        prefix = f"model.layers.{i}"
        for module, group in (("self_attn.qkv_proj", "qkv"), ("mlp.gate_up_proj", "gate_up"),
                              ("self_attn.o_proj", f"{prefix}.self_attn.o_proj"),
                              ("mlp.down_proj", f"{prefix}.mlp.down_proj")):
            node = nodes[f"{prefix}.{module}"]
            assert node["op"] == "fp8_linear" and node["attrs"]["activation_scaling"] == "static"
            assert len(node["inputs"]) == 4  # x, weight, weight_scale, input_scale (no bias)
            if group in ("qkv", "gate_up"):
                codes, w_scale, in_scale = unified(written, i, group)
            else:
                codes, w_scale, in_scale = _single(written[group])
            weight, ws, ins = (engine.weights[n] for n in node["inputs"][1:4])
            assert weight.dtype == "float8_e4m3" and ws.shape == ins.shape == (1,)
            np.testing.assert_array_equal(weight.load(), codes)
            assert ws.load()[0] == w_scale and ins.load()[0] == in_scale
        attention = next(n for n in engine.graph["nodes"] if n["op"] == "attention" and n["attrs"]["layer_idx"] == i)
        assert (attention["attrs"]["k_scale"], attention["attrs"]["v_scale"]) == \
            tuple(float(np.float32(s)) for s in kv_scales[i])
    # the fused parts really had different scales, so some codes were re-quantized
    assert len({float(written[f"model.layers.0.{p}"]["scale"]) for p in ("self_attn.q_proj", "self_attn.k_proj")}) == 2


def _single(entry):
    return entry["codes"].view(torch.uint8).numpy(), np.float32(entry["scale"]), np.float32(entry["input_scale"])


def _static_reference(llama_dir, tmp_path, layout="compressed-tensors"):
    """(checkpoint dir, HF model with its unified FP8 weights and static input quantization). No KV scales:
    the HF side keeps a float KV cache."""
    ckpt = tmp_path / "ckpt"
    written, _ = write_prequantized(llama_dir, ckpt, layout, weights="tensor", acts="tensor")

    def effective(m):
        layer, leaf = int(m.split(".")[2]), m.split(".", 3)[3]
        if leaf not in FUSED:
            return _single(written[m])
        codes, top, input_scale = unified_parts(written, layer, FUSED[leaf])
        return codes[m], top, input_scale

    return ckpt, fake_quant_hf(llama_dir, written, "tensor", effective)


@pytest.mark.parametrize("layout", ["compressed-tensors", "modelopt"])
def test_static_engine_semantics_match_hf_with_the_same_quantization(llama_dir, tmp_path, monkeypatch, layout):
    """The static engine's graph and weights, evaluated in float64 numpy by docs/engine_format.md's static
    fp8_linear (q = e4m3(x / input_scale), y = q·Wᵀ · input_scale · weight_scale), against HF running the same
    FP8 model: what the engine holds is the checkpoint's model (measured 2e-7 apart; 7-9% from unquantized)."""
    ckpt, hf = _static_reference(llama_dir, tmp_path, layout)
    engine = engine_of(ckpt)

    def static_fp8_linear(x, weight, weight_scale, input_scale, bias=None):
        q = graph_reference.e4m3(np.asarray(x, np.float32) / np.float32(input_scale[0]))
        return (q @ weight.T) * input_scale[0] * weight_scale[0] + (0.0 if bias is None else bias)

    assert all(n["attrs"].get("activation_scaling") == "static" for n in engine.graph["nodes"]
               if n["op"] == "fp8_linear")
    monkeypatch.setattr(graph_reference, "fp8_linear", static_fp8_linear)
    for prompt in random_prompts(np.random.default_rng(3), [6, 21]):
        ours = graph_reference.run_graph(engine, [prompt])[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert relative_error(ours, ref) < 1e-4


def test_static_output_matches_hf_with_the_same_quantization(llama_dir, tmp_path):
    """Runs the static engine (needs the runtime's static fp8_linear) against HF with the unified FP8 weights
    and static input quantization."""
    ckpt, hf = _static_reference(llama_dir, tmp_path)
    engine_of(ckpt).save(tmp_path / "engine")
    for prompt in random_prompts(np.random.default_rng(3), [6, 21]):
        ours = RunnerSession(tmp_path / "engine").step({0: prompt})[0]
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert relative_error(ours, ref) < 1e-3  # as in the per-token case above


def _with_config(src, dst, quantization_config=None, hf_quant=None):
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    if hf_quant is not None:
        with open(os.path.join(dst, "hf_quant_config.json"), "w") as f:
            json.dump({"quantization": hf_quant}, f)
    return dst


def _ct(weights=None, acts=None, **extra):
    q = ct_config(**extra)
    group = q["config_groups"]["group_0"]
    group["weights"].update(weights or {})
    if acts == "none":
        group["input_activations"] = None
    else:
        group["input_activations"].update(acts or {})
    return q


@pytest.mark.parametrize("quantization_config, hf_quant, message", [
    ({"quant_method": "awq", "bits": 4}, None, "AWQ group_size=None is not supported; supported: 32, 64, 128"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, None, "GPTQ bits=3 is not supported; supported: 4, 8"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, None, "quantization method 'bitsandbytes'"),
    (_ct(weights={"type": "int"}), None, "weights type 'int' with num_bits 8 is not supported"),
    (_ct(weights={"num_bits": 4}), None, "weights type 'float' with num_bits 4 is not supported"),
    (_ct(weights={"strategy": "group", "group_size": 128}), None, "weights strategy 'group' is not supported"),
    (_ct(weights={"strategy": "block", "block_structure": [128, 128]}), None, "strategy 'block' is not supported"),
    (_ct(acts={"strategy": "channel", "dynamic": False}), None,
     "input_activations strategy 'channel' with dynamic=False is not supported"),
    (_ct(acts={"strategy": "tensor", "dynamic": True}), None,
     "input_activations strategy 'tensor' with dynamic=True is not supported"),
    (_ct(weights={"strategy": "channel"}, acts={"strategy": "tensor", "dynamic": False}), None,
     "weights strategy 'channel' with static per-tensor input activations is not supported"),
    (_ct(acts="none"), None, "FP8 weight-only quantization is not supported"),
    (_ct(format="pack-quantized"), None, "format 'pack-quantized' is not supported"),
    (_ct(kv_cache_scheme={"num_bits": 8, "type": "int", "strategy": "tensor"}), None,
     "kv_cache_scheme type 'int' with num_bits 8 is not supported"),
    (None, {"quant_algo": "NVFP4", "kv_cache_quant_algo": None}, "ModelOpt quant_algo 'NVFP4' is not supported"),
    (None, {"quant_algo": "W4A8_AWQ"}, "ModelOpt quant_algo 'W4A8_AWQ' is not supported"),
    (None, {"quant_algo": "FP8", "kv_cache_quant_algo": "INT8"}, "ModelOpt kv_cache_quant_algo 'INT8' is not"),
])
def test_unsupported_quantization_is_refused(llama_dir, tmp_path, quantization_config, hf_quant, message):
    ckpt = _with_config(llama_dir, tmp_path / "q", quantization_config, hf_quant)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_hugging_face(ckpt)


def test_e5m2_weights_are_refused(llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    write_prequantized(llama_dir, ckpt, "compressed-tensors")
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = tensors[name].to(torch.float32).to(torch.float8_e5m2)
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match=f"{name} is float8_e5m2, but its module has a weight_scale: rtllm loads "
                                         f"pre-quantized weights stored as F8_E4M3"):
        AutoModelForCausalLM.from_hugging_face(ckpt)


def test_missing_scales_are_refused(llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    write_prequantized(llama_dir, ckpt, "modelopt", weights="tensor", acts="tensor", kv=True)
    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    del tensors["model.layers.0.self_attn.v_proj.v_scale"]
    del tensors["model.layers.1.mlp.up_proj.weight_scale"]
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_up_proj fuses .* but only some of them have a "
                                         "weight_scale"):
        AutoModelForCausalLM.from_hugging_face(ckpt)
    tensors["model.layers.1.mlp.up_proj.weight_scale"] = torch.tensor(0.01)
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match="declares an FP8 KV cache but has none of "
                                         "model.layers.0.self_attn.v_scale"):
        AutoModelForCausalLM.from_hugging_face(ckpt)
    del tensors["model.layers.0.self_attn.k_proj.input_scale"]
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.input_scale is missing: the checkpoint "
                                         "declares static input activations"):
        AutoModelForCausalLM.from_hugging_face(ckpt)
    tensors["model.layers.0.self_attn.k_proj.input_scale"] = torch.tensor([0.1, 0.2])
    save_file(tensors, os.path.join(ckpt, "model.safetensors"))
    with pytest.raises(ValueError, match="has shape \\[2\\]: a per-tensor scale must hold one value"):
        AutoModelForCausalLM.from_hugging_face(ckpt)


def test_a_conflicting_quant_config_is_refused(llama_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    write_prequantized(llama_dir, ckpt, "compressed-tensors")
    model = AutoModelForCausalLM.from_hugging_face(ckpt)
    with pytest.raises(ValueError, match="quant_algo FP8 was requested, but the checkpoint is pre-quantized as "
                                         "FP8_PER_CHANNEL_PER_TOKEN"):
        build(model, BuildConfig(max_seq_len=128), QuantConfig(quant_algo="FP8"))
    # an FP8 KV cache may be added to a checkpoint without KV scales (scale 1, as for any engine)
    engine = build(model, BuildConfig(max_seq_len=128), QuantConfig(kv_cache_quant_algo="FP8"))
    assert engine.config["quantization"]["kv_cache_quant_algo"] == "FP8"
