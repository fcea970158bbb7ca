"""The model registry: choosing a model class from config.json, and what it refuses."""
import json

import numpy as np
import pytest

from graph_reference import run_graph
from rtllm.builder import build
from rtllm.models import (AutoModelForCausalLM, GraniteForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM,
                          Qwen3ForCausalLM, register_model, supported_architectures)


def _copy_with_config(src, dst, **changes):
    """A copy of checkpoint `src` (weights linked) whose config.json has `changes` (None deletes a key)."""
    dst.mkdir()
    hf = json.loads((src / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            hf.pop(key, None)
        else:
            hf[key] = value
    (dst / "config.json").write_text(json.dumps(hf))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    return dst


def test_every_architecture_is_registered():
    assert supported_architectures() == ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                         "Qwen3ForCausalLM", "GraniteForCausalLM")


@pytest.mark.parametrize("arch, model_class", [("llama", LlamaForCausalLM), ("qwen2", Qwen2ForCausalLM),
                                               ("qwen3", Qwen3ForCausalLM), ("granite", GraniteForCausalLM)])
def test_config_without_architectures_falls_back_to_model_type(tiny_model, tmp_path, arch, model_class):
    checkpoint = tiny_model(arch)
    plain = _copy_with_config(checkpoint, tmp_path / "plain", architectures=None)
    model = AutoModelForCausalLM.from_hugging_face(plain)
    assert type(model) is model_class
    reference = build(AutoModelForCausalLM.from_hugging_face(checkpoint))
    engine = build(model)
    assert engine.graph == reference.graph
    prompts = [[3, 4, 5], [6]]
    np.testing.assert_array_equal(run_graph(engine, prompts), run_graph(reference, prompts))


def test_unknown_model_type(tiny_model, tmp_path):
    plain = _copy_with_config(tiny_model("llama"), tmp_path / "plain", architectures=None, model_type="gpt2")
    with pytest.raises(ValueError, match="no architectures, and model_type 'gpt2' is not supported; supported: "
                                         "llama, mistral, qwen2, qwen3, granite"):
        AutoModelForCausalLM.from_hugging_face(plain)


@pytest.mark.parametrize("quantization_config, method", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "'fp8'"),
    ({"bits": 4}, "None"),
])
def test_prequantized_checkpoints_are_refused(tiny_model, tmp_path, quantization_config, method):
    quantized = _copy_with_config(tiny_model("llama"), tmp_path / "q", quantization_config=quantization_config)
    with pytest.raises(ValueError, match=f"quantization method {method} \\(quantization_config\\) is not "
                                         f"supported: rtllm cannot load pre-quantized checkpoints"):
        AutoModelForCausalLM.from_hugging_face(quantized)


def test_model_class_must_match_the_checkpoint(tiny_model):
    # a subclass's checkpoint through its base gives the subclass; the other way is refused
    assert type(LlamaForCausalLM.from_hugging_face(tiny_model("qwen3"))) is Qwen3ForCausalLM
    with pytest.raises(ValueError, match="holds a LlamaForCausalLM, not a Qwen3ForCausalLM"):
        Qwen3ForCausalLM.from_hugging_face(tiny_model("llama"))


def test_an_architecture_registers_once():
    with pytest.raises(ValueError, match="'LlamaForCausalLM' \\(model_type 'llama'\\) is registered twice"):
        register_model("LlamaForCausalLM", model_type="llama")(type("Again", (LlamaForCausalLM,), {}))


def test_granite_tied_head_is_a_scaled_copy(tiny_model):
    """Tied embeddings: the table carries embedding_multiplier, the head 1 / logits_scaling, both read from the
    one checkpoint tensor."""
    model = AutoModelForCausalLM.from_hugging_face(tiny_model("granite", tie=True))
    table, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert table is not head
    np.testing.assert_array_equal(table.load() / 4.0, head.load() * 2.0)
    engine = build(model)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(engine.weights)
