"""Hugging Face transformers (float32, CPU) as the reference for whole models."""
import numpy as np
import torch
from transformers import AutoModelForCausalLM

# Every architecture the builder supports; "llama3" is Llama with llama3 rope scaling.
ARCHITECTURES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "granite"]
VOCAB_SIZE = 300  # the test tokenizer's byte-level BPE needs >= 258
BOS_ID, EOS_ID = 0, 1  # ids of "<s>" and "</s>" in the test tokenizer


# rtllm's stacked parameters -> the HF projections they hold, in row order
STACKED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def hf_tensor(tensors: dict, name: str):
    """The HF tensor (torch, from `tensors`: name -> tensor) that rtllm parameter `name` holds; a stacked
    one (model.layers.0.self_attn.qkv_proj.weight) is its HF parts concatenated along rows."""
    parent, module, leaf = name.rsplit(".", 2) if name.count(".") >= 2 else ("", *name.split("."))
    if module not in STACKED_PROJECTIONS:
        return tensors[name]
    return torch.cat([tensors[f"{parent}.{part}.{leaf}"] for part in STACKED_PROJECTIONS[module]])


def load_hf_model(path):
    """The checkpoint in float32 (bf16/fp16 weights are upcast exactly)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def hf_greedy(model, prompt_ids, max_new_tokens):
    """Greedy continuation of one prompt, end-of-sequence ignored."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_last_logits(model, prompt_ids):
    """Logits of the prompt's last token, float64 numpy [vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids], dtype=torch.long)).logits
    return logits[0, -1].double().numpy()


def random_prompts(rng, lengths, vocab_size=VOCAB_SIZE):
    """Token-id prompts of the given lengths, avoiding the special ids 0 and 1."""
    return [rng.integers(2, vocab_size, size=n).tolist() for n in lengths]


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
