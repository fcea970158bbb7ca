"""Random-weight checkpoints of named shapes (rtllm.models.presets), as the benchmarks use them."""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from rtllm.models.presets import hf_config, write_random_checkpoint


def test_checkpoint_loads_in_hf_with_the_preset_shapes(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path = write_random_checkpoint(tmp_path / "m", "llama-30m", dtype="float32", tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    config = hf_config("llama-30m", "float32")
    assert model.config.hidden_size == config["hidden_size"]
    assert model.config.num_hidden_layers == config["num_hidden_layers"]
    weights = load_file(f"{path}/model.safetensors")
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    # Never zeros: centred noise with the initializer's spread; norms near one.
    assert q.std() == pytest.approx(config.get("initializer_range", 0.02), rel=0.1)
    assert abs(float(q.mean())) < 1e-3
    assert np.all(np.abs(weights["model.norm.weight"] - 1.0) < 0.5)
    assert not np.array_equal(q, weights["model.layers.1.self_attn.q_proj.weight"])


def test_placeholder_tokenizer_decodes_every_id(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", "llama-30m", dtype="float32", tokenizer=True)
    vocab_size = hf_config("llama-30m")["vocab_size"]
    tokenizer = Tokenizer.from_file(f"{path}/tokenizer.json")
    assert tokenizer.get_vocab_size() == vocab_size
    ids = [0, 5, 1234, vocab_size - 1]
    assert tokenizer.decode(ids) == " ".join(f"t{i}" for i in ids)
    assert tokenizer.encode("t7 t42").ids == [7, 42]
    config = json.load(open(f"{path}/config.json"))
    special = json.load(open(f"{path}/tokenizer_config.json"))
    assert special["bos_token"] == f"t{config['bos_token_id']}"
    assert special["eos_token"] == f"t{config['eos_token_id']}"
