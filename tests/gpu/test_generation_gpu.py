"""Whole models on CUDA against HF transformers (float32, CPU) and rtllm's CPU backend.

The GPU computes in bf16 (fp16 for fp16 checkpoints), so two bounds replace exact equality:
- last-token logits: ‖gpu − hf‖ / ‖hf‖ <= 2e-2;
- greedy tokens, teacher-forced: for each token the GPU generated, HF's logits on the same prefix
  (prompt + the GPU's earlier tokens) must rank it first or within MARGIN_REL · rms(logits) of HF's top
  logit (bf16 rounding may resolve such a near-tie the other way). The margin is 0.1 rms: with a normwise
  error of 2e-2, a flip needs the errors of the two logits to differ by 5x the rms error. So the check is
  not vacuous, at least 90% of the GPU's tokens must be HF's exact argmax.
The CPU backend computes in float32 and must produce exactly HF's argmax at every step.
"""
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, VOCAB_SIZE, hf_last_logits, load_hf_model, random_prompts  # noqa: E402
from tokenizer_fixture import make_tokenizer  # noqa: E402

import rtllm  # noqa: E402
from rtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams, _core  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device or no CUDA backend in this build")

PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 48, 64]
MAX_NEW_TOKENS = 12
LOGITS_RTOL = 2e-2
MARGIN_REL = 0.1
VARIANTS = [("llama", "float32", False), ("llama3", "float32", False), ("mistral", "float32", False),
            ("qwen2", "float32", True), ("qwen3", "float32", False), ("llama", "bfloat16", False),
            ("qwen3", "bfloat16", True), ("mistral", "float16", False)]
BUILD = dict(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def make(arch, dtype, tie):
        if (arch, dtype, tie) not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{dtype}-{tie}")
            make_hf_checkpoint(path, arch=arch, dtype=dtype, tie_word_embeddings=tie, vocab_size=VOCAB_SIZE,
                               bos_token_id=BOS_ID, eos_token_id=EOS_ID)
            make_tokenizer(path, vocab_size=VOCAB_SIZE)
            cache[arch, dtype, tie] = path
        return cache[arch, dtype, tie]

    return make


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def hf_check(model, prompt, tokens):
    """Teacher-forced check of a greedy continuation against HF; returns how many tokens were HF's argmax."""
    num_exact = 0
    with torch.no_grad():
        for i, token in enumerate(tokens):
            logits = model(torch.tensor([list(prompt) + list(tokens[:i])])).logits[0, -1].double().numpy()
            best = int(np.argmax(logits))
            margin = MARGIN_REL * np.sqrt(np.mean(logits ** 2))
            assert logits[best] - logits[token] <= margin, (
                f"step {i}: token {token} is {logits[best] - logits[token]:.3g} below HF's argmax {best} "
                f"(margin {margin:.3g})")
            num_exact += token == best
    return num_exact


def generate(checkpoint_dir, prompts, device):
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    # On CUDA the pool is sized by the executor from a fraction of the free device memory.
    kv = KvCacheConfig(free_gpu_memory_fraction=0.02) if device == "cuda" else None
    with LLM(model=str(checkpoint_dir), build_config=BuildConfig(**BUILD), device=device,
             kv_cache_config=kv) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("arch,dtype,tie", VARIANTS)
def test_greedy_matches_hf_and_cpu(checkpoint, arch, dtype, tie):
    path = checkpoint(arch, dtype, tie)
    prompts = random_prompts(np.random.default_rng(2), PROMPT_LENGTHS)
    gpu, cpu = generate(path, prompts, "cuda"), generate(path, prompts, "cpu")
    hf = load_hf_model(path)
    num_exact = 0
    for prompt, gpu_tokens, cpu_tokens in zip(prompts, gpu, cpu):
        assert len(gpu_tokens) == len(cpu_tokens) == MAX_NEW_TOKENS
        assert hf_check(hf, prompt, cpu_tokens) == MAX_NEW_TOKENS
        num_exact += hf_check(hf, prompt, gpu_tokens)
    assert num_exact >= 0.9 * len(prompts) * MAX_NEW_TOKENS, f"only {num_exact} GPU tokens are HF's argmax"


@pytest.mark.parametrize("arch,dtype,tie", VARIANTS)
def test_last_token_logits_match_hf(checkpoint, tmp_path, arch, dtype, tie):
    path = checkpoint(arch, dtype, tie)
    model = AutoModelForCausalLM.from_hugging_face(str(path))
    rtllm.build(model, BuildConfig(**BUILD)).save(str(tmp_path / "engine"))
    engine = _core.Engine.load(str(tmp_path / "engine"))
    prompts = random_prompts(np.random.default_rng(1), PROMPT_LENGTHS)
    tpb = 16
    max_blocks = max(-(-len(p) // tpb) for p in prompts)
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(device=_core.DeviceKind.CUDA, tokens_per_block=tpb,
                                                           num_kv_blocks=max_blocks * len(prompts)))
    blocks = np.arange(max_blocks * len(prompts), dtype=np.int32)[::-1].reshape(len(prompts), max_blocks)
    logits = runner.forward(np.concatenate([np.asarray(p, np.int32) for p in prompts]), [len(p) for p in prompts],
                            [0] * len(prompts), np.ascontiguousarray(blocks))
    hf = load_hf_model(path)
    for prompt, row in zip(prompts, logits):
        assert relative_error(row, hf_last_logits(hf, prompt)) <= LOGITS_RTOL


@pytest.mark.parametrize("arch,dtype,tie", [("llama", "bfloat16", False), ("qwen3", "bfloat16", True)])
@pytest.mark.parametrize("max_seq_len", [48, 256])
def test_greedy_on_both_decode_attention_paths(checkpoint, arch, dtype, tie, max_seq_len):
    # Decode steps that split the keys (max_seq_len 256 allows 8 splits) run attention_decode_qkv, which
    # applies RoPE / qk-norm and writes the new key and value itself; with max_seq_len 48 (one split) they
    # run qkv_prepare and attention_decode. Both must follow HF.
    check_greedy_short_prompts(checkpoint(arch, dtype, tie), np.random.default_rng(3), max_seq_len)


# head_dim 80 and 96 (the decode kernels run them in the lanes of 128, the rest idle; prefill on its simple
# path) and 256, each on both decode attention paths as above; qwen3 adds qk-norm. hidden_size is
# num_heads · head_dim and head_dim is explicit in the HF config.
@pytest.mark.parametrize("arch,head_dim", [("llama", 80), ("llama", 96), ("llama", 256), ("qwen3", 80),
                                           ("qwen3", 96)])
@pytest.mark.parametrize("max_seq_len", [48, 256])
def test_greedy_matches_hf_at_head_dim(tmp_path, arch, head_dim, max_seq_len):
    path = make_hf_checkpoint(tmp_path / "hf", arch=arch, dtype="bfloat16", vocab_size=VOCAB_SIZE,
                              bos_token_id=BOS_ID, eos_token_id=EOS_ID, hidden_size=2 * head_dim,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim)
    make_tokenizer(path, vocab_size=VOCAB_SIZE)
    assert load_hf_model(path).config.head_dim == head_dim
    check_greedy_short_prompts(path, np.random.default_rng(head_dim + max_seq_len), max_seq_len)


def check_greedy_short_prompts(path, rng, max_seq_len):
    """Greedy tokens on CUDA for four short prompts, teacher-forced against HF (hf_check)."""
    prompts = random_prompts(rng, [1, 5, 17, 30])
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    build = dict(BUILD, max_input_len=32, max_seq_len=max_seq_len)
    with LLM(model=str(path), build_config=BuildConfig(**build), device="cuda",
             kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.02)) as llm:
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    hf = load_hf_model(path)
    num_exact = 0
    for prompt, tokens in zip(prompts, outputs):
        assert len(tokens) == MAX_NEW_TOKENS
        num_exact += hf_check(hf, prompt, tokens)
    assert num_exact >= 0.9 * len(prompts) * MAX_NEW_TOKENS, f"only {num_exact} GPU tokens are HF's argmax"


def test_greedy_with_an_odd_vocabulary_at_more_than_16_sequences(tmp_path):
    """An LM head of 301 columns (float32 logits rows of 1,204 bytes, not 16-byte aligned, which cuBLASLt
    refuses) at decode steps of 20 sequences, beyond the GEMV's 16 of the linear op: HF's greedy tokens."""
    vocab = VOCAB_SIZE + 1
    path = make_hf_checkpoint(tmp_path / "hf", arch="llama", dtype="float32", vocab_size=vocab, bos_token_id=BOS_ID,
                              eos_token_id=EOS_ID)
    prompts = random_prompts(np.random.default_rng(5), [3 + 2 * i for i in range(20)], vocab_size=vocab)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(str(path), device="cuda", skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(max_tokens=4096),
             **dict(BUILD, max_batch_size=24)) as llm:
        outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    hf = load_hf_model(path)
    num_exact = sum(hf_check(hf, prompt, tokens) for prompt, tokens in zip(prompts, outputs))
    assert all(len(tokens) == 6 for tokens in outputs)
    assert num_exact >= 0.9 * len(prompts) * 6, f"only {num_exact} GPU tokens are HF's argmax"


@pytest.mark.parametrize("arch", ["llama", "qwen3", "granite"])
def test_prompt_logprobs_on_cuda_follow_hf(checkpoint, arch):
    """Rows of logits beyond one per sequence on CUDA (max_num_logits): the prompt's log-probabilities
    against HF's teacher-forced ones, within bf16's error, and the greedy tokens unchanged by scoring."""
    path = checkpoint(arch, "float32", False)
    prompts = random_prompts(np.random.default_rng(11), [5, 40, 90])
    scored = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with LLM(path, device="cuda", max_num_logits=8 + 64, skip_tokenizer_init=True,
             kv_cache_config=KvCacheConfig(max_tokens=4096), **BUILD) as llm:
        outputs = llm.generate(prompts, scored, use_tqdm=False)
        again = llm.generate(prompts, plain, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in again]
    hf = load_hf_model(path)
    for out, prompt in zip(outputs, prompts):
        with torch.no_grad():
            expected = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].double(), -1).numpy()
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        got = np.array([entry[t] for entry, t in zip(out.prompt_logprobs[1:], prompt[1:])])
        want = expected[np.arange(len(prompt) - 1), prompt[1:]]
        assert np.max(np.abs(got - want)) < 0.05 * max(1.0, np.max(np.abs(want)))
        assert all(len(entry) in (2, 3) for entry in out.prompt_logprobs[1:])  # the top 2 and the token
