"""GGUF files (rtllm.models.gguf): models against HF transformers loading the same file, the tokenizer,
the integer block decoders against gguf's own dequantize, and the refusals.

Tiny GGUF files are written here with gguf.GGUFWriter from the random HF checkpoints of conftest.py, as
llama.cpp's converter writes them (q/k rows permuted for llama); transformers, which dequantizes and
un-permutes them with its own code, is the reference.
"""
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer

import rtllm
from rtllm import LLM, BuildConfig, QuantConfig, SamplingParams, _core
from rtllm.cli import main as cli_main
from rtllm.models import AutoModelForCausalLM
from rtllm.models.gguf import GGUFFile, decode_blocks, decode_q4_0, decode_q4_1, decode_q8_0
from rtllm.models.gguf_tokenizer import load_gguf_tokenizer

from hf_reference import hf_greedy, random_prompts, relative_error
from tokenizer_fixture import CHAT_TEMPLATE

Q = gguf.GGMLQuantizationType
PROMPT_LENGTHS = [1, 5, 12, 33]
LOGITS_RTOL = 1e-4
TEXTS = ["Hello world! How are you today?", "Café, naïve 你好世界 😀👍🏽 and  two  spaces\n\tx",
         "<s>special</s> tokens inside <s>", "def main():\n    return 0\n"]

# HF module of a layer -> GGUF name (llama.cpp's tensor names)
_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF's rotate-half rows -> llama.cpp's interleaved ones."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        module, leaf = rest.rsplit(".", 1)
        return f"blk.{layer}.{_GGUF_NAMES[module]}.{leaf}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


def random_k_blocks(shape, qtype, seed) -> np.ndarray:
    """Random k-quant blocks of a [N, K] tensor (K a multiple of 256) with small f16 super-block scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8)
    blocks = raw.reshape(-1, gguf.GGML_QUANT_SIZES[qtype][1])
    # of either sign, so that rows differ in more than noise (unsigned codes give every row the same mean)
    scales = (rng.choice([-1, 1], (len(blocks), 2)) * rng.uniform(0.0005, 0.003, (len(blocks), 2))).astype(np.float16)
    if qtype == Q.Q6_K:  # ..., scales int8 [16], d f16 last
        blocks[:, -2:] = scales[:, :1].view(np.uint8)
    else:  # d, dmin f16 first
        blocks[:, :4] = scales.view(np.uint8)
    return raw


def write_gguf(checkpoint, path, qtype=Q.F32, arch="llama", extra_tensor=None, tokenizer_model="gpt2"):
    """The HF checkpoint (and its tokenizer.json) as a GGUF file: 2-D weights stored as `qtype`, norms and
    biases as F32."""
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [None] * config["vocab_size"]
    for token, index in vocab.items():
        tokens[index] = token
    types = [gguf.TokenType.NORMAL] * len(tokens)
    for added in tok["added_tokens"]:
        types[added["id"]] = gguf.TokenType.CONTROL
    for i, token in enumerate(tokens):  # padded as llama.cpp pads a vocabulary shorter than the model's
        if token is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config["head_dim"])
    w.add_rope_freq_base(config["rope_theta"] if "rope_theta" in config else
                         config["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        array = array.astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            array = llama_cpp_permute(array, config["num_attention_heads"])
        elif arch == "llama" and ".k_proj." in name:
            array = llama_cpp_permute(array, config["num_key_value_heads"])
        if array.ndim == 2 and qtype in K_QUANTS:  # no numpy quantizer: random blocks
            w.add_tensor(gguf_name(name), random_k_blocks(array.shape, qtype, len(name)), raw_dtype=qtype)
        elif array.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(name), array)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_from_gguf(path):
    directory, name = os.path.split(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval()


def runner_last_logits(engine, prompts, tokens_per_block=16):
    """Last-token logits of each prompt in one packed context step of the C++ runner."""
    max_blocks = max(-(-len(p) // tokens_per_block) for p in prompts)
    num_blocks = max_blocks * len(prompts)
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=num_blocks,
                                                           tokens_per_block=tokens_per_block))
    block_ids = np.arange(num_blocks, dtype=np.int32).reshape(len(prompts), max_blocks)
    input_ids = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    return runner.forward(input_ids, [len(p) for p in prompts], [0] * len(prompts), block_ids)


def assert_last_logits_match(path, hf, prompts):
    """rtllm's engine built from the GGUF file gives the HF model's last-token logits for each prompt."""
    engine = rtllm.build(AutoModelForCausalLM.from_hugging_face(str(path)),
                         BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=256)).to_core()
    for prompt, row in zip(prompts, runner_last_logits(engine, prompts)):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1].double().numpy()
        assert relative_error(row, expected) < LOGITS_RTOL


@pytest.fixture(scope="module")
def gguf_files(tiny_model, tmp_path_factory):
    """(arch, type name, tied) -> a GGUF file of a tiny random model."""
    cache = {}

    def make(arch="llama", qtype=Q.F32, tie=False):
        key = (arch, qtype, tie)
        if key not in cache:
            path = tmp_path_factory.mktemp("gguf") / f"{arch}-{qtype.name}{'-tied' if tie else ''}.gguf"
            cache[key] = write_gguf(tiny_model(arch, "float32", tie), path, qtype, arch)
        return cache[key]

    return make


# Untied llama in F32 and Q8_0 (its q/k rows permuted), tied llama, qwen2 (q/k/v biases, not permuted);
# Q8_0, Q4_0 and Q4_1 linears run as weight_only_linear on the file's own blocks (gguf_quant.py)
VARIANTS = [("llama", Q.F32, False), ("llama", Q.Q8_0, False), ("llama", Q.Q8_0, True),
            ("qwen2", Q.F32, True), ("qwen2", Q.Q8_0, False), ("llama", Q.Q4_0, False), ("llama", Q.Q4_1, True),
            ("qwen2", Q.Q4_1, False)]


@pytest.mark.parametrize("arch,qtype,tie", VARIANTS, ids=lambda v: getattr(v, "name", str(v)))
def test_logits_and_greedy_match_transformers_on_the_same_file(gguf_files, arch, qtype, tie, cpu_amx):
    path = gguf_files(arch, qtype, tie)
    hf = hf_from_gguf(path)
    prompts = random_prompts(np.random.default_rng(3), PROMPT_LENGTHS)
    model = AutoModelForCausalLM.from_hugging_face(str(path))
    assert model.config.tie_word_embeddings == tie and model.config.dtype == "float32"
    assert_last_logits_match(path, hf, prompts)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with LLM(model=str(path), max_seq_len=128, max_batch_size=4) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 10)


@pytest.mark.parametrize("qtype,tie", [(Q.Q8_0, False), (Q.Q8_0, True), (Q.Q4_0, True), (Q.Q4_1, False)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_q8_0_q4_0_q4_1_linears_keep_the_files_blocks(gguf_files, qtype, tie):
    path = gguf_files("llama", qtype, tie)
    engine = rtllm.build(AutoModelForCausalLM.from_hugging_face(str(path)),
                         BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=256))
    quant = engine.config["quantization"]
    assert quant["quant_algo"] == ("W8A16" if qtype == Q.Q8_0 else "W4A16") and quant["group_size"] == 32
    assert quant["has_zero_point"] == (qtype == Q.Q4_1)
    nodes = [n for n in engine.graph["nodes"] if n["op"] in ("linear", "weight_only_linear")]
    assert nodes and all(n["op"] == "weight_only_linear" for n in nodes)  # the LM head too, tied or not
    assert all(n["attrs"]["group_size"] == 32 and n["attrs"]["has_offset"] == (qtype == Q.Q4_1) for n in nodes)
    # the fused q/k/v codes are the file's blocks of q, k and v, rows back in HF order
    reference = GGUFFile(str(path))
    model = AutoModelForCausalLM.from_hugging_face(str(path))
    reference.permute_qk(model.config.num_heads, model.config.num_kv_heads)
    qkv = next(n for n in nodes if "qkv_proj" in n["inputs"][1])
    parts = [reference.codes(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
    codes = np.concatenate([q for q, _, _ in parts])
    stored = engine.weights[qkv["inputs"][1]].load()
    if qtype == Q.Q8_0:
        np.testing.assert_array_equal(stored, codes)
    else:
        from rtllm.builder.safetensors_io import unpack_int4
        np.testing.assert_array_equal(unpack_int4(stored), codes)
    np.testing.assert_array_equal(engine.weights[qkv["inputs"][2]].load(), np.concatenate([s for _, s, _ in parts]))
    head = next(n for n in nodes if n["inputs"][1].startswith("lm_head"))
    assert engine.weights[head["inputs"][1]].shape == (model.config.vocab_size, model.config.hidden_size)


def test_no_quant_builds_the_dequantized_model(gguf_files):
    path = gguf_files("llama", Q.Q4_1, False)
    engine = rtllm.build(AutoModelForCausalLM.from_hugging_face(str(path)),
                         BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=256),
                         QuantConfig(quant_algo="NO_QUANT"))
    assert {n["op"] for n in engine.graph["nodes"]} & {"linear", "weight_only_linear"} == {"linear"}
    with pytest.raises(ValueError, match="keeps its own Q4_1 weights"):
        rtllm.build(AutoModelForCausalLM.from_hugging_face(str(path)), BuildConfig(max_seq_len=128),
                    QuantConfig(quant_algo="FP8"))


def test_fp8_calibration_reads_text_through_the_files_tokenizer(gguf_files, tiny_model, recwarn):
    """FP8 of a GGUF file calibrates on the corpus tokenized by the tokenizer the file describes (not on
    random ids): the same static scales as the HF checkpoint it was written from, with its tokenizer.json."""
    config = BuildConfig(max_batch_size=4, max_seq_len=128, max_num_tokens=256)
    quant = QuantConfig(quant_algo="FP8", kv_cache_quant_algo="FP8", calib_size=4, calib_max_seq_length=64)
    from_file = rtllm.build(AutoModelForCausalLM.from_hugging_face(str(gguf_files("llama", Q.F32, False))),
                            config, quant)
    assert not [w for w in recwarn if "random token ids" in str(w.message)]
    from_checkpoint = rtllm.build(AutoModelForCausalLM.from_hugging_face(str(tiny_model("llama"))), config, quant)

    def scales(engine):
        inputs = {k: float(v.load()[0]) for k, v in engine.weights.items() if k.endswith("input_scale")}
        kv = [(n["attrs"]["k_scale"], n["attrs"]["v_scale"]) for n in engine.graph["nodes"] if "k_scale" in n["attrs"]]
        return inputs, kv

    inputs, kv = scales(from_file)
    assert inputs and kv and (inputs, kv) == scales(from_checkpoint)


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_are_dequantized_as_transformers_does(tiny_model, tmp_path, qtype):
    # hidden and intermediate sizes of 256: one k-quant super-block per row
    checkpoint = tiny_model("llama", hidden_size=256, intermediate_size=256, head_dim=64)
    path = write_gguf(checkpoint, tmp_path / f"{qtype.name}.gguf", qtype)
    hf = hf_from_gguf(path)
    prompts = random_prompts(np.random.default_rng(4), PROMPT_LENGTHS)
    assert_last_logits_match(path, hf, prompts)


def llama3_rope_factors(config: dict) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for llama3 rope scaling: per-frequency divisors."""
    rope = {**(config.get("rope_scaling") or {}), **(config.get("rope_parameters") or {})}
    dim, base = config["head_dim"], rope.get("rope_theta", config.get("rope_theta"))
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    factors = []
    for freq in 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim):
        wavelen = 2 * np.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, np.float32)


def test_llama3_rope_freqs_match_the_hf_checkpoint(tiny_model, tmp_path):
    """llama.cpp keeps llama3 rope scaling as a rope_freqs tensor; rtllm on the GGUF file equals
    transformers on the HF checkpoint it came from (which scales from its config)."""
    checkpoint = tiny_model("llama3")
    config = json.loads((checkpoint / "config.json").read_text())
    factors = llama3_rope_factors(config)
    assert factors.min() == 1.0 and factors.max() == 8.0  # all three bands occur
    path = write_gguf(checkpoint, tmp_path / "llama3.gguf", Q.F32, extra_tensor=("rope_freqs.weight", factors))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    prompts = random_prompts(np.random.default_rng(5), [40, 90])
    assert_last_logits_match(path, hf, prompts)


def test_tokenizer_matches_transformers_and_the_original(gguf_files, tiny_model):
    path = gguf_files("llama", Q.F32, False)
    ours = load_gguf_tokenizer(str(path))
    reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original = Tokenizer.from_file(str(tiny_model("llama") / "tokenizer.json"))
    for text in TEXTS:
        ids = ours.encode(text)  # the file's add_bos_token: <s> first, once
        assert ids == reference(text).input_ids == original.encode(text).ids
        assert ids[0] == 0 and ids.count(0) == 1 + text.count("<s>")
        assert ours.decode(ids) == text.replace("<s>", "").replace("</s>", "")
    assert (ours.bos_token, ours.eos_token, ours.eos_token_ids) == ("<s>", "</s>", [1])
    messages = [{"role": "user", "content": "Hi there"}]
    assert ours.apply_chat_template(messages) == reference.apply_chat_template(messages, tokenize=False,
                                                                                add_generation_prompt=True)


def write_sentencepiece_gguf(path):
    """A GGUF file holding only a SentencePiece-style vocabulary as llama.cpp writes Llama 2's: <unk> <s> </s>,
    256 byte tokens, then pieces scored by merge rank, no merges (they follow from the scores)."""
    from tokenizers import SentencePieceBPETokenizer
    from tokenizer_fixture import CORPUS

    trained = SentencePieceBPETokenizer()
    trained.train_from_iterator(CORPUS, vocab_size=500, show_progress=False)
    pieces = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256 + \
        [gguf.TokenType.NORMAL] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    path = write_sentencepiece_gguf(tmp_path / "sp.gguf")
    ours = load_gguf_tokenizer(str(path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="sp.gguf")
    for text in TEXTS + ["  leading spaces", "ÿ rare bytes: \x01 ⅞ 𝔘"]:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids
        assert ids[0] == 1  # bos, llama.cpp's default for a SentencePiece vocabulary
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert any(3 <= i < 259 for i in ours.encode("𝔘"))  # byte fallback


def test_build_cli_writes_an_engine_with_the_tokenizer(gguf_files, tmp_path, capsys):
    path = gguf_files("llama", Q.Q8_0, False)
    engine_dir = tmp_path / "engine"
    assert cli_main(["build", str(path), "-o", str(engine_dir), "--max-seq-len", "128",
                     "--max-batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert "dequantized" not in captured.err and "quantized 9 of 9 linears to W8A16" in captured.out  # blocks kept
    assert {"config.json", "rank0.engine", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(engine_dir))
    messages = [{"role": "user", "content": "Bonjour, ça va ?"}]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = []
    for model in (engine_dir, path, path.parent):  # the engine, the file, its directory (one .gguf there)
        with LLM(model=str(model), max_seq_len=128, max_batch_size=4) as llm:
            assert llm.tokenizer.chat_template == CHAT_TEMPLATE
            outputs.append(llm.chat(messages, params, use_tqdm=False)[0].outputs[0].token_ids)
    assert outputs[0] == outputs[1] == outputs[2]


# SmolLM2-135M-Instruct, Q4_1 (its embedding Q8_0): chat answers and tokenizer against transformers.
CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I reverse a list in Python?",
                "Give me three tips for sleeping better.", "What is 17 times 23?", "Explain photosynthesis briefly.",
                "Who wrote Romeo and Juliet?",
                "Café au lait ou thé ? Réponds en français."]


@pytest.fixture(scope="module")
def smollm2_gguf():
    from smollm2 import gguf_path
    return gguf_path()


def test_smollm2_q4_1_chat_matches_transformers(smollm2_gguf, cpu_amx):
    """The file's Q4_1 blocks as W4A16 group 32 with offsets, on the FMA kernels and (cpu_amx) on AMX tiles."""
    hf = hf_from_gguf(smollm2_gguf)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    with LLM(model=smollm2_gguf, max_seq_len=512, max_batch_size=len(CHAT_PROMPTS)) as llm:
        conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
        prompts = [llm.tokenizer.apply_chat_template(c, tokenize=True) for c in conversations]
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, 32)


def test_smollm2_tokenizer_matches_transformers(smollm2_gguf):
    directory, name = os.path.split(smollm2_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    ours = load_gguf_tokenizer(smollm2_gguf)
    texts = TEXTS + ["<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n", "   ",
                     "Ærøskøbing → 東京 🇫🇷 1234567 <|endoftext|>"]
    for text in texts:
        assert ours.encode(text) == reference(text).input_ids
    messages = [{"role": "user", "content": "Hello!"}]
    assert ours.apply_chat_template(messages, tokenize=True) == \
        reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.eos_token == "<|im_end|>"


# Integer block decoders against gguf's dequantize.

@pytest.mark.parametrize("qtype,decoder", [(Q.Q8_0, decode_q8_0), (Q.Q4_0, decode_q4_0), (Q.Q4_1, decode_q4_1)],
                         ids=["Q8_0", "Q4_0", "Q4_1"])
def test_block_decoders_match_gguf_dequantize(qtype, decoder):
    rng = np.random.default_rng(int(qtype))
    n, k = 24, 320
    w = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1)) + rng.uniform(-1, 1, (n, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    reference = gguf.quants.dequantize(raw, qtype).astype(np.float32)
    q, scale, offset = decoder(raw, (n, k))
    assert (q.dtype, q.shape, scale.dtype, scale.shape) == (np.int8, (n, k), np.float16, (n, k // 32))
    for decoded in (decode_blocks(raw, qtype.name, (n, k)), decoder(raw.reshape(-1), (n, k))):
        np.testing.assert_array_equal(decoded[0], q)
    s = np.repeat(scale.astype(np.float32), 32, axis=1)
    if qtype == Q.Q4_1:
        assert offset.dtype == np.float32 and offset.shape == (n, k // 32)
        assert q.min() >= -8 and q.max() <= 7
        o = np.repeat(offset, 32, axis=1)
        ours = q.astype(np.float32) * s + o
        # u d + m regrouped as (u - 8) d + (m + 8 d): a few float32 roundings of the block's magnitude
        bound = 4 * np.finfo(np.float32).eps * (np.abs(o) + 16 * np.abs(s))
        assert np.all(np.abs(ours - reference) <= bound)
    else:
        assert offset is None
        if qtype == Q.Q4_0:
            assert q.min() >= -8 and q.max() <= 7
        np.testing.assert_array_equal(q.astype(np.float32) * s, reference)  # exact


def test_codes_of_a_permuted_tensor_match_its_dequantized_rows(tiny_model, tmp_path):
    """GGUFFile.codes (q/k rows unpermuted on the raw blocks) equals float32 (unpermuted after dequantizing)."""
    path = write_gguf(tiny_model("llama"), tmp_path / "q4.gguf", Q.Q4_0)
    f = GGUFFile(str(path))
    f.permute_qk(4, 2)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        q, scale, _ = f.codes(name)
        np.testing.assert_array_equal(q * np.repeat(scale.astype(np.float32), 32, axis=1), f.float32(name))
    with pytest.raises(ValueError, match="no integer decoding of GGUF type F32"):
        f.codes("model.norm.weight")


# Refusals.

def test_unknown_architecture_is_refused(tiny_model, tmp_path):
    path = write_gguf(tiny_model("llama"), tmp_path / "x.gguf", arch="gpt2")
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: llama, qwen2"):
        LLM(model=str(path))
    assert cli_main(["build", str(path), "-o", str(tmp_path / "engine")]) == 2


def test_unsupported_tensor_types_are_refused(tiny_model, tmp_path, capsys):
    odd = ("blk.0.extra.weight", gguf.quants.quantize(np.ones((2, 32), np.float32), Q.Q5_0))
    path = write_gguf(tiny_model("llama"), tmp_path / "q5.gguf", extra_tensor=(*odd, None, Q.Q5_0))
    with pytest.raises(ValueError, match="'blk.0.extra.weight' has type Q5_0, which rtllm does not read"):
        AutoModelForCausalLM.from_hugging_face(str(path))
    # A type enum the gguf package does not know either
    path = write_gguf(tiny_model("llama"), tmp_path / "odd.gguf")
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[0].field.parts[4][0] = 200
    reader.data.flush()
    del reader
    with pytest.raises(ValueError, match="a tensor has type 200, which is no GGUF tensor type"):
        LLM(model=str(path))
    assert cli_main(["build", str(path), "-o", str(tmp_path / "engine")]) == 2
    assert "200" in capsys.readouterr().err


def test_unsupported_tokenizer_is_refused(tiny_model, tmp_path, capsys):
    path = write_gguf(tiny_model("llama"), tmp_path / "t5.gguf", tokenizer_model="t5")
    with pytest.raises(ValueError, match="tokenizer model 't5' is not supported; supported: gpt2, llama"):
        LLM(model=str(path))
    with LLM(model=str(path), skip_tokenizer_init=True, max_seq_len=64) as llm:  # token ids still run
        assert len(llm.generate([[5, 6]], SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids) == 2
    engine_dir = tmp_path / "engine"
    assert cli_main(["build", str(path), "-o", str(engine_dir), "--max-seq-len", "64"]) == 0
    assert "no tokenizer written: " in capsys.readouterr().err
    assert "tokenizer.json" not in os.listdir(engine_dir)


def test_missing_file_is_refused(tmp_path, capsys):
    missing = str(tmp_path / "missing.gguf")
    with pytest.raises(ValueError, match="missing.gguf"):
        LLM(model=missing)
    assert cli_main(["build", missing, "-o", str(tmp_path / "engine")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_gguf_package_is_optional(monkeypatch, gguf_files):
    # rtllm imports it only for a GGUF file ...
    code = "import sys, rtllm, rtllm.models, rtllm.cli; assert 'gguf' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    # ... and says how to install it when it is missing
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match="pip install gguf"):
        AutoModelForCausalLM.from_hugging_face(str(gguf_files()))
