"""The shipped demo model (rtllm/demo_model): loads in HF transformers, rtllm's greedy generation of
it matches HF's token for token, and it has learned Python (low loss on a held-out stdlib module)."""
import json
import math
import os

import pytest
import torch

from rtllm import LLM, SamplingParams
from rtllm.default_model import default_model_dir
from rtllm.llmapi.tokenizer import TokenizerWrapper

from hf_reference import hf_greedy, load_hf_model

MODEL_DIR = default_model_dir()
PROMPTS = ["def fibonacci(n):", "import os\n", "class Foo:", "    for i in range(len(items)):\n"]
NUM_NEW_TOKENS = 24
# A module examples/train_demo_model.py holds out of the tokenizer and of training (VALIDATION_MODULES).
HELD_OUT_MODULE = "textwrap.py"
# train_log.txt: final validation loss 4.39 nats/token (textwrap.py alone: 4.29 on Python 3.11); the
# bound leaves 0.5 for other Python versions' textwrap.py. Uniform over the vocabulary: ln(4096) = 8.32.
HELD_OUT_LOSS_BOUND = 4.39 + 0.5


@pytest.fixture(scope="module")
def hf_model():
    return load_hf_model(MODEL_DIR)


@pytest.fixture(scope="module")
def tokenizer():
    return TokenizerWrapper.from_pretrained(MODEL_DIR)


def test_checkpoint_is_a_small_tied_llama_in_safetensors(hf_model):
    files = set(os.listdir(MODEL_DIR))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md", "train_log.txt"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]  # no pickled weights
    assert os.path.getsize(os.path.join(MODEL_DIR, "model.safetensors")) < 16 * 2**20
    for name in files:  # installed copies must be readable by every user
        assert os.stat(os.path.join(MODEL_DIR, name)).st_mode & 0o044 == 0o044, name
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert type(hf_model).__name__ == "LlamaForCausalLM"
    assert 3e6 < sum(p.numel() for p in hf_model.parameters()) < 6e6


def test_tokenizer_keeps_special_tokens_and_chat_template(tokenizer):
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1)
    ids = tokenizer.encode("def f(x):\n    return x")
    assert ids[0] == 0 and tokenizer.decode(ids) == "def f(x):\n    return x"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_greedy_generation_matches_hf(hf_model, tokenizer):
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    with LLM(MODEL_DIR) as llm:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, output in zip(PROMPTS, outputs):
        expected = hf_greedy(hf_model, tokenizer.encode(prompt), NUM_NEW_TOKENS)
        assert output.outputs[0].token_ids == expected, prompt
        assert output.outputs[0].text == tokenizer.decode(expected)


def test_model_learned_python(hf_model, tokenizer):
    # The held-out module is read from the running Python's standard library, not from a copy.
    with open(os.path.join(MODEL_DIR, "train_log.txt"), encoding="utf-8") as f:
        assert repr(HELD_OUT_MODULE) in next(line for line in f if line.startswith("data:"))
    with open(os.path.join(os.path.dirname(os.__file__), HELD_OUT_MODULE), encoding="utf-8") as f:
        ids = tokenizer.encode(f.read())
    window = hf_model.config.max_position_embeddings
    losses = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor([ids[start:start + window + 1]])
            logits = hf_model(chunk[:, :-1]).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item())
    loss = sum(losses) / (len(ids) - 1)  # nats per token
    uniform = math.log(hf_model.config.vocab_size)
    assert uniform - loss > 3  # perplexity over 20x below the uniform guess's
    assert loss < HELD_OUT_LOSS_BOUND
