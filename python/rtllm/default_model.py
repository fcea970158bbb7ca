"""The built-in default model: a small random-weight Llama checkpoint made on first use.

It lets `rtllm generate` run with no model at hand. It is written with numpy + safetensors (no
torch) under $RTLLM_CACHE (default ~/.cache/rtllm)/default-model, with a byte-level BPE tokenizer
trained on a few Python standard library sources (text every Python install has).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile


NOTE = "Note: the built-in default model has random weights; its output is not meaningful text."
VERSION = 2  # bump to regenerate caches made by an older layout

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 2048,
    "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 0, "eos_token_id": 1,
}
BOS, EOS = "<s>", "</s>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
_CORPUS_MODULES = ("textwrap.py", "argparse.py", "difflib.py", "string.py", "json/decoder.py",
                   "calendar.py", "pprint.py")


def cache_dir() -> str:
    root = os.environ.get("RTLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rtllm")
    return os.path.join(root, "default-model")


def _corpus():
    stdlib = os.path.dirname(os.__file__)
    for name in _CORPUS_MODULES:
        path = os.path.join(stdlib, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield f.read()


def _write_tokenizer(path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                             special_tokens=[(BOS, 0), (EOS, 1)])
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "chat_template": CHAT_TEMPLATE, "model_max_length": CONFIG["max_position_embeddings"]}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def write_default_model(path: str) -> str:
    """Writes the checkpoint (config.json, model.safetensors, generation_config.json, tokenizer)."""
    from .models.presets import write_random_checkpoint

    write_random_checkpoint(path, CONFIG, dtype="float32")
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1}, f, indent=2)
    _write_tokenizer(path)
    with open(os.path.join(path, "rtllm_default_model.json"), "w") as f:
        json.dump({"version": VERSION, "random_weights": True}, f)
    return path


def _is_current(path: str) -> bool:
    try:
        with open(os.path.join(path, "rtllm_default_model.json")) as f:
            return json.load(f).get("version") == VERSION
    except (OSError, ValueError):
        return False


def default_model_dir(print_note: bool = True) -> str:
    """The default checkpoint's directory, made on first use (atomically: a sibling temp dir is
    renamed into place, so concurrent first uses do not see a half-written model)."""
    path = cache_dir()
    if not _is_current(path):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".default-model-", dir=parent)
        try:
            write_default_model(staging)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            try:
                os.rename(staging, path)
            except OSError:  # another process renamed its copy first
                if not _is_current(path):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if print_note:
        print(NOTE, file=sys.stderr)
    return path
