"""The tokenizer a GGUF file describes (tokenizer.ggml.* metadata) as a `tokenizers` Tokenizer plus the
tokenizer_config.json of an HF checkpoint (special tokens, add_bos_token, chat_template).

Supported: "gpt2" (byte-level BPE with merges: Llama 3, Qwen2, SmolLM, GPT-2 style vocabularies) and
"llama" (SentencePiece BPE with byte fallback: Llama 2, Mistral; merges from the file, else recovered from
the scores). Other tokenizer models ("t5", ...) are refused, naming the model.
"""

import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from .gguf import GGUFFile

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> the split regex its merges were learned with (llama.cpp's llama-vocab.cpp); other
# byte-level vocabularies (gpt2, smollm, starcoder, ...) split with GPT-2's, which ByteLevel applies.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "dbrx": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
SUPPORTED_MODELS = ("gpt2", "llama")


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character map, in which byte-level vocabularies spell their tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(gguf_file: GGUFFile, tokens: list) -> Tokenizer:
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Tokens are stored in the byte alphabet; respell any that is not (written as plain text)
    vocab = {}
    for index, token in enumerate(tokens):
        if not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = gguf_file.field("tokenizer.ggml.merges")
    if merges is None:
        raise ValueError(f"{gguf_file.path}: a byte-level (gpt2) tokenizer without tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(gguf_file.field("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # A token marked CONTROL outside the byte alphabet is a mislabel of llama.cpp's; it is not added
    # (it would grow the vocabulary past the model's)
    added = [AddedToken(t, normalized=False, special=True)
             for t, kind in zip(tokens, _token_types(gguf_file, tokens))
             if kind == CONTROL and set(t) <= alphabet]
    added += [AddedToken(t, normalized=False, special=False)
              for t, kind in zip(tokens, _token_types(gguf_file, tokens)) if kind == USER_DEFINED and t in vocab]
    # already in the vocabulary: they keep their ids, and are matched whole in text
    tokenizer.add_special_tokens([a for a in added if a.special])
    tokenizer.add_tokens([a for a in added if not a.special])
    return tokenizer


def _merges_from_scores(vocab: dict, scores: list) -> list:
    """SentencePiece BPE merges implied by a vocabulary: every split of a token into two tokens, the
    merged token's score first (higher merges earlier), as transformers' generate_merges."""
    merges = []
    for token, index in vocab.items():
        local = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges += [(left, right, scores[index]) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(gguf_file: GGUFFile, tokens: list) -> Tokenizer:
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    merges = gguf_file.field("tokenizer.ggml.merges")
    if merges is not None:
        merges = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = gguf_file.field("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError(f"{gguf_file.path}: a SentencePiece (llama) tokenizer with neither merges nor scores")
        merges = _merges_from_scores(vocab, scores)
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(gguf_file.field("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", split=False,
                                                       prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(content=" ", left=1)] * prefix)
    types = _token_types(gguf_file, tokens)
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    return tokenizer


def _token_types(gguf_file: GGUFFile, tokens: list) -> list:
    return gguf_file.field("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)


def tokenizer_from_gguf(gguf_file: GGUFFile | str) -> tuple:
    """(tokenizers.Tokenizer, tokenizer_config dict) of a GGUF file's tokenizer metadata."""
    if not isinstance(gguf_file, GGUFFile):
        gguf_file = GGUFFile(gguf_file)
    kind = gguf_file.field("tokenizer.ggml.model")
    tokens = gguf_file.field("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ValueError(f"{gguf_file.path} holds no tokenizer (tokenizer.ggml.model / tokens)")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"{gguf_file.path}: GGUF tokenizer model {kind!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODELS)}")
    tokenizer = _byte_level(gguf_file, tokens) if kind == "gpt2" else _sentencepiece(gguf_file, tokens)
    # llama.cpp adds bos to a SentencePiece vocabulary whose file does not say otherwise
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": bool(gguf_file.field("tokenizer.ggml.add_bos_token", kind == "llama")),
              "add_eos_token": bool(gguf_file.field("tokenizer.ggml.add_eos_token", False))}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = gguf_file.field(f"tokenizer.ggml.{key}")
        if token_id is not None:
            if not 0 <= int(token_id) < len(tokens):
                raise ValueError(f"{gguf_file.path}: tokenizer.ggml.{key}={token_id} is outside the vocabulary "
                                 f"of {len(tokens)} tokens")
            config[name] = tokens[int(token_id)]
    # bos / eos added by the post-processor, as transformers and llama.cpp add them: always, even to a
    # text that starts with the bos token
    bos = [config["bos_token"]] if config["add_bos_token"] and "bos_token" in config else []
    eos = [config["eos_token"]] if config["add_eos_token"] and "eos_token" in config else []
    if bos or eos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=bos + ["$A"] + eos, pair=bos + ["$A"] + eos + bos + ["$B:1"] + eos,
            special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(bos + eos)])
    template = gguf_file.field("tokenizer.chat_template")
    if template is not None:
        config["chat_template"] = template
    return tokenizer, config


def load_gguf_tokenizer(gguf_file: GGUFFile | str):
    """The TokenizerWrapper of a GGUF file."""
    from ..llmapi.tokenizer import TokenizerWrapper

    return TokenizerWrapper(*tokenizer_from_gguf(gguf_file))


def save_gguf_tokenizer(gguf_file: GGUFFile | str, directory: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json (with the chat template) into `directory`, as an
    HF checkpoint holds them: what an engine directory carries."""
    tokenizer, config = tokenizer_from_gguf(gguf_file)
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
