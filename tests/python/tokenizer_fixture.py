"""make_tokenizer: a tiny byte-level BPE tokenizer directory for tests.

Byte-level BPE needs all 256 bytes plus the special tokens, so the vocabulary has at least 258
entries; pair it with checkpoints of vocab_size >= the tokenizer's (default 300).
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS = "<s>", "</s>"

# Multi-byte text (accents, CJK, emoji, combining marks) so merges produce tokens holding partial
# UTF-8 characters, which the incremental detokenizer must hold back.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Hello world! Hello there, how are you today? I am fine, thank you.",
    "def main():\n    print('hello')\n    return 0\n",
    "Café, naïve, résumé, façade, Ærøskøbing, Straße, jalapeño.",
    "你好，世界。今天天气很好。我们去公园散步吧。中文分词测试。",
    "日本語のテキストです。ありがとうございます。こんにちは世界。",
    "한국어 문장입니다. 안녕하세요 세계.",
    "Emoji: 😀😃😄😁🚀🔥✨👍🏽 and flags 🇺🇸🇫🇷 and family 👨‍👩‍👧‍👦.",
    "Math: ∑ ∫ √ ∞ ≈ ≠ ≤ ≥ π θ λ; arrows → ← ↑ ↓.",
    "Русский текст: привет, мир! Ελληνικά: γειά σου κόσμε.",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(path, vocab_size=300, chat_template=CHAT_TEMPLATE):
    """Trains the tokenizer and writes tokenizer.json + tokenizer_config.json into `path`.

    Ids: "<s>" = 0 (bos, prepended by the post-processor), "</s>" = 1 (eos); the vocabulary has at
    most `vocab_size` entries. Returns `path`.
    """
    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= 258")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0), (EOS, 1)])
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    assert tokenizer.get_vocab_size() <= vocab_size
    os.makedirs(path, exist_ok=True)
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "clean_up_tokenization_spaces": False, "model_max_length": 4096}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return path
