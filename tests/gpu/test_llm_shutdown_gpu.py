"""LLM.shutdown() gives the device memory back at once, while the LLM object is still referenced.

Each LLM sizes its KV pool from free_gpu_memory_fraction of the device memory left after its weights,
so the pool takes almost the whole GPU. Had the first LLM kept its weights and pool after shutdown,
the second one with the same fraction would fail to load or get a small fraction of the blocks.
"""
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "python"))
from checkpoints import make_hf_checkpoint  # noqa: E402
from hf_reference import BOS_ID, EOS_ID, random_prompts  # noqa: E402

import rtllm  # noqa: E402
from rtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams, _core  # noqa: E402
from rtllm.models import AutoModelForCausalLM  # noqa: E402

pytestmark = pytest.mark.skipif(not _core.cuda_available(), reason="no CUDA device or no CUDA backend in this build")

# About 0.5 B parameters in bf16 (1 GiB of weights), Llama-shaped with head_dim 128.
MODEL = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             head_dim=128, max_position_embeddings=2048)
NUM_LAYERS, VOCAB = 8, 32000
BUILD = dict(max_batch_size=8, max_input_len=256, max_seq_len=1024, max_num_tokens=2048)
FRACTION = 0.9
GIB = 1 << 30


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shutdown-model")
    make_hf_checkpoint(path / "hf", arch="llama", dtype="bfloat16", vocab_size=VOCAB, num_layers=NUM_LAYERS,
                       bos_token_id=BOS_ID, eos_token_id=EOS_ID, **MODEL)
    model = AutoModelForCausalLM.from_hugging_face(str(path / "hf"))
    rtllm.build(model, BuildConfig(**BUILD)).save(str(path / "engine"))
    return str(path / "engine")


def run(llm, prompts):
    """Greedy tokens of each prompt and the size of the LLM's KV pool in blocks. One prompt at a time:
    batches that depend on arrival timing would pick other kernels (GEMV or GEMM) and round differently."""
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    tokens = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return tokens, llm.get_stats()["kv_cache"]["num_total_blocks"]


def test_second_llm_after_shutdown_fills_the_gpu_again(engine_dir):
    prompts = random_prompts(np.random.default_rng(0), [5, 17, 64, 200], vocab_size=VOCAB)
    kv = KvCacheConfig(free_gpu_memory_fraction=FRACTION)
    make = lambda: LLM(model=engine_dir, device="cuda", kv_cache_config=kv, skip_tokenizer_init=True)
    # Once-per-process costs (kernel modules, library handles) are paid here, before the measured
    # LLMs, so that the two see the same device.
    with make() as warmup:
        run(warmup, prompts)
    torch.cuda.empty_cache()
    free_before, _ = torch.cuda.mem_get_info()

    first = make()
    free_during, _ = torch.cuda.mem_get_info()
    first_tokens, first_blocks = run(first, prompts)
    first.shutdown()  # `first` stays referenced: the memory must come back now, not at collection
    free_after, _ = torch.cuda.mem_get_info()
    assert free_before - free_during >= 0.8 * FRACTION * free_before, (
        f"the first LLM took only {(free_before - free_during) / GIB:.1f} of {free_before / GIB:.1f} GiB free")
    assert free_after >= free_before - GIB // 4, (
        f"{(free_before - free_after) / GIB:.2f} GiB still in use after shutdown")

    with make() as second:
        second_tokens, second_blocks = run(second, prompts)
    assert second_blocks >= first_blocks
    assert all(len(t) == 16 for t in first_tokens)
    assert second_tokens == first_tokens  # the same engine, batch and kernels: the same greedy tokens
