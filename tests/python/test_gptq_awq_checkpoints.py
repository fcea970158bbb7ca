"""Pre-quantized AutoAWQ (GEMM) and GPTQ (AutoGPTQ / GPTQModel) checkpoints: written here from a tiny random
HF checkpoint by packing known integer codes in numpy (independently of rtllm's loader), then loaded by rtllm.

- the engine's weight_only_linear weights decode (q · scale + offset, float64) to exactly the float64
  dequantized reference (u - z) · s of the written codes;
- an AWQ checkpoint whose codes are rtllm's own W4A16 zero-point grid equals rtllm's own quantization of
  the same weights (codes, scales, offsets, logits);
- the engine's logits match HF transformers running the dequantized float weights; greedy tokens agree;
- act-order (desc_act) GPTQ checkpoints, whose g_idx permutes the groups over K, load as the same codes with
  the columns ordered by group and a gather_columns node ordering x alike (the op against numpy), and match HF;
- bad inputs are refused naming the value: group size not dividing K, corrupt qweight shapes, bits 3, an
  unknown quant_method, a g_idx with uneven groups, fused parts with different act orders.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from engine_fixture import RunnerSession, write_one_op_engine
from hf_reference import hf_greedy, load_hf_model, random_prompts, relative_error
from rtllm import LLM, RtllmError, SamplingParams
from rtllm.builder import BuildConfig, build
from rtllm.builder.safetensors_io import unpack_int4
from rtllm.builder.tensor import Parameter
from rtllm.models import AutoModelForCausalLM
from rtllm.quantization import QuantConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble i of a word holds column AWQ_ORDER[i]


def pack_awq(u: np.ndarray) -> np.ndarray:
    """[R, C] codes in [0, 15] -> AutoAWQ int32 words [R, C / 8]."""
    R, C = u.shape
    words = np.zeros((R, C // 8), np.uint64)
    for j in range(C // 8):
        for i in range(8):
            words[:, j] |= u[:, 8 * j + AWQ_ORDER[i]].astype(np.uint64) << np.uint64(4 * i)
    return words.astype(np.uint32).view(np.int32)


def pack_gptq_rows(u: np.ndarray, bits: int) -> np.ndarray:
    """[K, N] codes -> GPTQ qweight [K * bits / 32, N]: consecutive rows, the first in the low bits."""
    per = 32 // bits
    words = np.zeros((u.shape[0] // per, u.shape[1]), np.uint64)
    for i in range(per):
        words |= u[i::per].astype(np.uint64) << np.uint64(bits * i)
    return words.astype(np.uint32).view(np.int32)


def pack_gptq_cols(z: np.ndarray, bits: int) -> np.ndarray:
    """[G, N] values -> GPTQ qzeros [G, N * bits / 32]: consecutive columns, the first in the low bits."""
    return np.ascontiguousarray(pack_gptq_rows(np.ascontiguousarray(z.T), bits).T)


def grid(w: np.ndarray, bits: int, group: int, sym: bool) -> tuple:
    """Integer codes u [N, K], zero points z [N, K / group] and float16 scales s [N, K / group] of w on a
    round-to-nearest grid (the test's own; symmetric: z = 2^(bits-1))."""
    N, K = w.shape
    g = w.reshape(N, K // group, group).astype(np.float64)
    top = 2 ** bits - 1
    if sym:
        s = (np.abs(g).max(axis=2) / (2 ** (bits - 1) - 1)).astype(np.float16)
        z = np.full(s.shape, 2 ** (bits - 1))
    else:
        lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
        s = ((hi - lo) / top).astype(np.float16)
        z = np.clip(np.rint(-lo / s.astype(np.float64)), 0, top).astype(np.int64)
    u = np.clip(np.rint(g / s.astype(np.float64)[..., None]) + z[..., None], 0, top).astype(np.int64)
    return u.reshape(N, K), z, s


def dequant(u, z, s, group):
    return (u - np.repeat(z, group, axis=1)) * np.repeat(s.astype(np.float64), group, axis=1)


def write_checkpoint(src, dst, method, bits=4, group=32, sym=False, fmt=None, g_idx=None, config_extra=None):
    """Copies `src` to `dst` with every decoder linear packed as `method` ("awq" or "gptq"); returns
    {module: float64 dequantized weight [N, K]} and writes the dequantized float checkpoint to dst/../ref.
    g_idx(module, K, G), when given, assigns GPTQ inputs to groups (act-order); each group is quantized over
    its own inputs."""
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    ref_tensors = dict(tensors)
    deq = {}
    for name in list(tensors):
        module = name[:-len(".weight")]
        if not name.endswith(".weight") or not module.endswith(LINEARS):
            continue
        w = tensors.pop(name)
        N, K = w.shape
        G = K if group == -1 else group
        groups = np.arange(K) // G if g_idx is None else np.asarray(g_idx(module, K, G))
        order = np.argsort(groups, kind="stable")  # act-order: each group's inputs, quantized together
        u_sorted, z, s = grid(np.ascontiguousarray(w[:, order]), bits, G, sym)
        u = np.empty_like(u_sorted)
        u[:, order] = u_sorted
        deq[module] = np.empty((N, K))
        deq[module][:, order] = dequant(u_sorted, z, s, G)
        ref_tensors[name] = deq[module].astype(np.float32)
        if method == "awq":
            tensors[f"{module}.qweight"] = pack_awq(np.ascontiguousarray(u.T))
            tensors[f"{module}.qzeros"] = pack_awq(np.ascontiguousarray(z.T))
        else:
            stored = z - 1 if fmt in (None, "gptq") else z  # AutoGPTQ stores z - 1
            tensors[f"{module}.qweight"] = pack_gptq_rows(np.ascontiguousarray(u.T), bits)
            tensors[f"{module}.qzeros"] = pack_gptq_cols(np.ascontiguousarray(stored.T) & (2 ** bits - 1), bits)
            tensors[f"{module}.g_idx"] = groups.astype(np.int32)
        tensors[f"{module}.scales"] = np.ascontiguousarray(s.T)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    if method == "awq":
        q = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": not sym, "version": "gemm"}
    else:
        q = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": False}
        if fmt is not None:
            q["checkpoint_format"] = fmt
    q.update(config_extra or {})
    config["quantization_config"] = q
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    ref = os.path.join(os.path.dirname(dst), os.path.basename(dst) + "_ref")
    shutil.copytree(src, ref)
    save_file(ref_tensors, os.path.join(ref, "model.safetensors"))
    return deq, ref


def engine_of(path, quant_config=None):
    return build(AutoModelForCausalLM.from_hugging_face(str(path)), BuildConfig(max_seq_len=128), quant_config)


def decoded_weights(engine) -> dict:
    """module -> float64 q · scale + offset of each weight_only_linear node."""
    out = {}
    for node in engine.graph["nodes"]:
        if node["op"] != "weight_only_linear":
            continue
        codes = engine.weights[node["inputs"][1]]
        q = codes.load()
        q = unpack_int4(q) if codes.dtype == "int4" else q.astype(np.int64)
        G = node["attrs"]["group_size"]
        w = q * np.repeat(engine.weights[node["inputs"][2]].load().astype(np.float64), G, axis=1)
        if node["attrs"]["has_offset"]:
            w += np.repeat(engine.weights[node["inputs"][3]].load().astype(np.float64), G, axis=1)
        out[node["inputs"][1].rsplit(".", 1)[0]] = w
    return out


def expected_fused(deq: dict) -> dict:
    out = {}
    for i in range(2):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj"] = np.concatenate([deq[f"{p}.self_attn.{m}_proj"] for m in "qkv"])
        out[f"{p}.self_attn.o_proj"] = deq[f"{p}.self_attn.o_proj"]
        out[f"{p}.mlp.gate_up_proj"] = np.concatenate([deq[f"{p}.mlp.gate_proj"], deq[f"{p}.mlp.up_proj"]])
        out[f"{p}.mlp.down_proj"] = deq[f"{p}.mlp.down_proj"]
    return out


def assert_matches_hf(engine, tmp_path, ref, seed):
    """The engine's last-token logits match HF transformers on the dequantized checkpoint `ref`; LLM's greedy
    tokens from the checkpoint at tmp_path / "ckpt" equal HF's."""
    engine.save(tmp_path / "engine")
    hf = load_hf_model(ref)
    prompts = random_prompts(np.random.default_rng(seed), [4, 21])
    for prompt in prompts:
        ours = RunnerSession(tmp_path / "engine").step({0: prompt})[0]
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        assert relative_error(ours, expected) < 1e-4
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    with LLM(str(tmp_path / "ckpt"), skip_tokenizer_init=True, max_seq_len=128) as llm:
        tokens = llm.generate([prompts[0]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert tokens == hf_greedy(hf, prompts[0], 8)


@pytest.fixture(scope="module")
def llama_dir(tiny_model):
    return tiny_model("llama")


CASES = {  # name -> (method, bits, group, sym, checkpoint_format, expected quant_algo)
    "awq_g32": ("awq", 4, 32, False, None, "W4A16_AWQ"),
    "awq_g64": ("awq", 4, 64, False, None, "W4A16_AWQ"),
    "gptq4_sym_g32": ("gptq", 4, 32, True, None, "W4A16_GPTQ"),
    "gptq4_asym_v2_g32": ("gptq", 4, 32, False, "gptq_v2", "W4A16_GPTQ"),
    "gptq8_sym_g32": ("gptq", 8, 32, True, "gptq", "W8A16_GPTQ"),
    "gptq8_asym_v2_per_channel": ("gptq", 8, -1, False, "gptq_v2", "W8A16_GPTQ"),
    "gptq4_sym_per_channel": ("gptq", 4, -1, True, None, "W4A16_GPTQ"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_loads_to_the_dequantized_weights_and_matches_hf(llama_dir, tmp_path, case):
    method, bits, group, sym, fmt, algo = CASES[case]
    deq, ref = write_checkpoint(llama_dir, str(tmp_path / "ckpt"), method, bits, group, sym, fmt)
    engine = engine_of(tmp_path / "ckpt")
    assert engine.config["quantization"]["quant_algo"] == algo
    nodes = [n for n in engine.graph["nodes"] if "linear" in n["op"]]
    assert [n["op"] for n in nodes].count("weight_only_linear") == 8  # lm_head stays a linear
    for n in nodes:
        if n["op"] == "weight_only_linear":
            assert n["attrs"]["has_offset"] == (not sym)
            assert engine.weights[n["inputs"][1]].dtype == ("int4" if bits == 4 else "int8")
    got = decoded_weights(engine)
    for module, w in expected_fused(deq).items():
        np.testing.assert_array_equal(got[module], w, err_msg=module)  # exact: q·s + (mid - z)·s = (u - z)·s
    assert_matches_hf(engine, tmp_path, ref, seed=3)


@pytest.mark.parametrize("method, fmt", [("awq", None), ("gptq", "gptq"), ("gptq", "gptq_v2")])
def test_checkpoint_equals_rtllm_own_w4a16(llama_dir, tmp_path, method, fmt):
    """The test's zero-point grid is rtllm's W4A16 one, so quantizing the float weights with rtllm gives the
    same engine weights as loading the packed AWQ or GPTQ (AutoGPTQ's z - 1, GPTQModel's z) checkpoint."""
    write_checkpoint(llama_dir, str(tmp_path / "ckpt"), method, 4, 32, sym=False, fmt=fmt)
    loaded = engine_of(tmp_path / "ckpt")
    own = engine_of(llama_dir, QuantConfig(quant_algo="W4A16", group_size=32, has_zero_point=True))
    assert [(n["op"], n["inputs"], n["attrs"]) for n in loaded.graph["nodes"]] == \
        [(n["op"], n["inputs"], n["attrs"]) for n in own.graph["nodes"]]
    for name, weight in own.weights.items():
        if name.endswith(("weight_scale", "weight_offset")) or loaded.weights[name].dtype == "int4":
            assert loaded.weights[name].dtype == weight.dtype, name
            np.testing.assert_array_equal(loaded.weights[name].load(), weight.load(), err_msg=name)


def _refused(tmp_path, llama_dir, message, **kwargs):
    mutate = kwargs.pop("mutate", None)
    write_checkpoint(llama_dir, str(tmp_path / "ckpt"), **kwargs)
    if mutate:
        mutate(str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match=message):
        engine_of(tmp_path / "ckpt").save(tmp_path / "engine")


def test_bits_3_is_refused(llama_dir, tmp_path):
    _refused(tmp_path, llama_dir, r"GPTQ bits=3 is not supported; supported: 4, 8", method="gptq",
             config_extra={"bits": 3})


def test_awq_gemv_version_is_refused(llama_dir, tmp_path):
    _refused(tmp_path, llama_dir, r"AWQ version 'gemv' is not supported", method="awq",
             config_extra={"version": "gemv"})


def test_unknown_quant_method_is_refused(llama_dir, tmp_path):
    _refused(tmp_path, llama_dir, r"quantization method 'bitsandbytes'.*not supported", method="awq",
             config_extra={"quant_method": "bitsandbytes"})


def test_group_size_not_dividing_k_is_refused(llama_dir, tmp_path):
    # written with group 32, declared 128: K = 64 (hidden) is not a multiple of 128
    _refused(tmp_path, llama_dir, r"self_attn.q_proj: K=64 input features is not a multiple of the checkpoint's "
             r"group_size=128", method="gptq", config_extra={"group_size": 128})


def test_corrupt_qweight_shape_is_refused(llama_dir, tmp_path):
    def cut(path):
        tensors = load_file(os.path.join(path, "model.safetensors"))
        name = "model.layers.1.mlp.down_proj.qweight"
        tensors[name] = tensors[name][:-1]
        save_file(tensors, os.path.join(path, "model.safetensors"))
    _refused(tmp_path, llama_dir, r"model.layers.1.mlp.down_proj.qweight has shape \[127, 8\], expected \[128, 8\]",
             method="awq", mutate=cut)


def act_order(module, K, G):
    """GPTQ's desc_act g_idx: the inputs in a (here random) order of decreasing Hessian diagonal, cut into groups
    of G. One order per K and layer, as the parts of a fused linear share their input's Hessian."""
    layer = int(module.split(".")[2])
    perm = np.random.default_rng(1000 * layer + K).permutation(K)
    g_idx = np.empty(K, np.int64)
    g_idx[perm] = np.arange(K) // G
    return g_idx


@pytest.mark.parametrize("bits, group, sym", [(4, 32, False), (8, 32, True)])
def test_act_order_checkpoint_matches_hf(llama_dir, tmp_path, bits, group, sym):
    deq, ref = write_checkpoint(llama_dir, str(tmp_path / "ckpt"), "gptq", bits, group, sym, "gptq",
                                g_idx=act_order, config_extra={"desc_act": True})
    engine = engine_of(tmp_path / "ckpt")
    nodes = engine.graph["nodes"]
    producers = {o: n for n in nodes for o in n["outputs"]}
    got = decoded_weights(engine)
    for node in (n for n in nodes if n["op"] == "weight_only_linear"):
        gather = producers[node["inputs"][0]]  # every quantized linear reads its input through the order
        assert gather["op"] == "gather_columns", node
        order = engine.weights[gather["inputs"][1]].load()
        module = node["inputs"][1].rsplit(".", 1)[0]
        expected = expected_fused(deq)[module]
        # the engine's codes are the checkpoint's, columns in the input order: exact
        np.testing.assert_array_equal(got[module], expected[:, order], err_msg=module)
    assert_matches_hf(engine, tmp_path, ref, seed=4)


def test_gather_columns_op(llama_dir, tmp_path):
    """gather_columns against numpy on the CPU runner, then an index outside [0, K) refused at run time."""
    rng = np.random.default_rng(5)
    K, C = 40, 56
    x = rng.normal(size=(48, K)).astype(np.float32)  # token ids must stay below C, the op's vocab_size
    index = rng.integers(0, K, C).astype(np.int32)  # repeats allowed: any column choice
    weights = {"index": Parameter((C,), "int32", lambda: index, "index")}
    write_one_op_engine(tmp_path / "ok", llama_dir, x, C, "gather_columns", ["index"], weights, {})
    session = RunnerSession(tmp_path / "ok")
    tokens = [3, 0, 47, 17, 3]
    out = session.step({i: [t] for i, t in enumerate(tokens)})
    np.testing.assert_array_equal(np.stack([out[i] for i in range(len(tokens))]), x[tokens][:, index])
    bad = index.copy()
    bad[7] = K
    weights = {"index": Parameter((C,), "int32", lambda: bad, "index")}
    write_one_op_engine(tmp_path / "bad", llama_dir, x, C, "gather_columns", ["index"], weights, {})
    with pytest.raises(RtllmError, match=rf"gather_columns: index {K} \(at 7\) outside \[0, {K}\)"):
        RunnerSession(tmp_path / "bad").step({0: [1]})


def test_uneven_act_order_groups_are_refused(llama_dir, tmp_path):
    def uneven(module, K, G):
        g_idx = act_order(module, K, G)
        g_idx[g_idx == 1] = 0  # group 0 takes group 1's inputs
        return g_idx
    _refused(tmp_path, llama_dir, r"model.layers.0.self_attn.q_proj.g_idx assigns its 64 inputs to 2 groups unevenly "
             r"\(group sizes \[0, 64\]\)", method="gptq", g_idx=uneven)


def test_fused_parts_with_different_act_orders_are_refused(llama_dir, tmp_path):
    def per_module(module, K, G):  # k_proj ordered unlike q_proj, though both read one input
        return act_order(module, K, G) if not module.endswith("k_proj") else act_order(module, K, G)[::-1].copy()
    _refused(tmp_path, llama_dir, r"model.layers.0.self_attn.k_proj.g_idx orders the inputs unlike "
             r"model.layers.0.self_attn.q_proj.g_idx", method="gptq", g_idx=per_module)


def test_a_conflicting_quant_config_is_refused(llama_dir, tmp_path):
    write_checkpoint(llama_dir, str(tmp_path / "ckpt"), "awq")
    with pytest.raises(ValueError, match=r"pre-quantized as W4A16_AWQ"):
        engine_of(tmp_path / "ckpt", QuantConfig(quant_algo="W8A16"))
