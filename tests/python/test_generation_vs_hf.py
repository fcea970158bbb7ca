"""Whole models through the C++ engine against HF transformers (float32, CPU)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rtllm
from rtllm import LLM, BuildConfig, SamplingParams
from rtllm import _core
from rtllm.models import AutoModelForCausalLM

from hf_reference import (ARCHITECTURES, hf_greedy, hf_last_logits, load_hf_model, random_prompts,
                          relative_error)

PROMPT_LENGTHS = [1, 3, 7, 12, 20, 33, 48, 64]  # a batch of 8 prompts of different lengths
MAX_NEW_TOKENS = 12
# (arch, weight dtype, tied embeddings): every architecture, tied and untied, bf16 and fp16 weights.
VARIANTS = [(arch, "float32", False) for arch in ARCHITECTURES] + [
    ("llama", "float32", True), ("qwen2", "float32", True), ("granite", "float32", True),
    ("llama", "bfloat16", False), ("qwen3", "bfloat16", True), ("mistral", "float16", False)]
# rtllm computes in float32 whatever the weight dtype, so it matches HF in float32 on the same
# (upcast) weights equally closely for bf16/fp16 weights.
LOGITS_RTOL = 1e-4


def build_engine(checkpoint, engine_dir, **build_kwargs):
    model = AutoModelForCausalLM.from_hugging_face(str(checkpoint))
    config = BuildConfig(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512,
                         **build_kwargs)
    rtllm.build(model, config).save(str(engine_dir))
    return engine_dir


def runner_last_logits(engine_dir, prompts, tokens_per_block=16):
    """Last-token logits of each prompt in one packed context step of the C++ runner."""
    engine = _core.Engine.load(str(engine_dir))
    max_blocks = max(-(-len(p) // tokens_per_block) for p in prompts)
    num_blocks = max_blocks * len(prompts)
    runner = _core.ModelRunner(engine, _core.RuntimeConfig(num_kv_blocks=num_blocks,
                                                           tokens_per_block=tokens_per_block))
    # Blocks handed out in reverse so no sequence's blocks are in ascending order.
    block_ids = np.arange(num_blocks, dtype=np.int32)[::-1].reshape(len(prompts), max_blocks)
    input_ids = np.concatenate([np.asarray(p, np.int32) for p in prompts])
    return runner.forward(input_ids, [len(p) for p in prompts], [0] * len(prompts),
                          np.ascontiguousarray(block_ids))


@pytest.mark.parametrize("arch,dtype,tie", VARIANTS)
def test_last_token_logits_match_hf(tiny_model, tmp_path, arch, dtype, tie):
    checkpoint = tiny_model(arch, dtype, tie)
    prompts = random_prompts(np.random.default_rng(1), PROMPT_LENGTHS)
    logits = runner_last_logits(build_engine(checkpoint, tmp_path / "engine"), prompts)
    hf = load_hf_model(checkpoint)
    for prompt, row in zip(prompts, logits):
        assert relative_error(row, hf_last_logits(hf, prompt)) < LOGITS_RTOL


@pytest.mark.parametrize("arch,dtype,tie", VARIANTS)
def test_greedy_batch_matches_hf(tiny_model, arch, dtype, tie):
    checkpoint = tiny_model(arch, dtype, tie)
    prompts = random_prompts(np.random.default_rng(2), PROMPT_LENGTHS)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    build_config = BuildConfig(max_batch_size=8, max_input_len=128, max_seq_len=256, max_num_tokens=512)
    with LLM(model=str(checkpoint), build_config=build_config) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    hf = load_hf_model(checkpoint)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf, prompt, MAX_NEW_TOKENS)


def test_granite_3_multipliers_match_hf(tiny_model, tmp_path):
    """Granite 3.x's own multipliers (not powers of two), folded into float32 weights."""
    checkpoint = tiny_model("granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                            attention_multiplier=0.0078125, logits_scaling=8.0)
    prompts = random_prompts(np.random.default_rng(6), PROMPT_LENGTHS)
    logits = runner_last_logits(build_engine(checkpoint, tmp_path / "engine"), prompts)
    hf = load_hf_model(checkpoint)
    for prompt, row in zip(prompts, logits):
        assert relative_error(row, hf_last_logits(hf, prompt)) < LOGITS_RTOL


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_greedy_alone_equals_in_batch(tiny_model, dtype, cpu_amx):
    """F16 weights run on AMX tiles where the CPU has them (cpu_amx), decode and prefill alike."""
    checkpoint = tiny_model("qwen3", dtype)
    prompts = random_prompts(np.random.default_rng(3), PROMPT_LENGTHS)
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(model=str(checkpoint)) as llm:
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        alone = [llm.generate(p, params, use_tqdm=False).outputs[0].token_ids for p in prompts]
    assert batched == alone


def test_unfused_engine_matches_fused(tiny_model, tmp_path):
    checkpoint = tiny_model("qwen3")
    prompts = random_prompts(np.random.default_rng(4), PROMPT_LENGTHS)
    fused = runner_last_logits(build_engine(checkpoint, tmp_path / "fused"), prompts)
    unfused = runner_last_logits(build_engine(checkpoint, tmp_path / "unfused", fuse=False), prompts)
    assert relative_error(unfused, fused) < 1e-5


LOAD_AND_GENERATE = """
import json, sys
from rtllm import LLM, SamplingParams
prompts = json.loads(sys.argv[2])
with LLM(model=sys.argv[1]) as llm:
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                        use_tqdm=False)
print(json.dumps([o.outputs[0].token_ids for o in outs]))
"""


def test_saved_engine_in_fresh_process_gives_same_outputs(tiny_model, tmp_path):
    checkpoint = tiny_model("llama3")
    engine_dir = build_engine(checkpoint, tmp_path / "engine")
    prompts = random_prompts(np.random.default_rng(5), [4, 9, 17])
    with LLM(model=str(checkpoint)) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
                            use_tqdm=False)
    expected = [o.outputs[0].token_ids for o in outs]
    result = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(engine_dir), json.dumps(prompts)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
