"""TokenizerWrapper and IncrementalDetokenizer against HF transformers' tokenizer."""
import json
import os
import random

import pytest
from hypothesis import given, settings, strategies as st

from rtllm.llmapi import IncrementalDetokenizer, TokenizerWrapper
from tokenizer_fixture import CORPUS, make_tokenizer

TEXTS = ["Hello world!", "Café naïve 你好，世界 😀🚀👍🏽", "日本語 한국어 Русский", "  spaces\tand\nlines  ", "x"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return TokenizerWrapper.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    import transformers
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


def test_special_tokens(tokenizer, hf_tokenizer):
    assert tokenizer.bos_token_id == hf_tokenizer.bos_token_id == 0
    assert tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 1
    assert tokenizer.eos_token_ids == [1]
    assert tokenizer.vocab_size == len(hf_tokenizer)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.encode(text, add_special_tokens=False) == \
        hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == \
        hf_tokenizer.decode(ids, skip_special_tokens=False)


def test_add_bos_token_from_config(tokenizer_dir, tmp_path):
    # Without a post-processor, tokenizer_config.json's add_bos_token decides.
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    spec["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TokenizerWrapper.from_pretrained(str(tmp_path))
    assert tok.encode("Hello")[0] == 0
    assert tok.encode("Hello", add_special_tokens=False)[0] != 0


def test_generation_config_eos_ids(tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(open(os.path.join(tokenizer_dir, name), "rb").read())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    assert TokenizerWrapper.from_pretrained(str(tmp_path)).eos_token_ids == [1, 7]


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        TokenizerWrapper.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tokenizer, hf_tokenizer, add_generation_prompt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                tokenize=False)
    assert text == expected
    assert text.startswith("<s>") and text.endswith("<|assistant|>\n") == add_generation_prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    assert ids == hf_tokenizer(expected, add_special_tokens=False).input_ids


def test_chat_template_raise_exception(tokenizer):
    with pytest.raises(ValueError, match="unknown role robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_chat_template_missing(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(open(os.path.join(tokenizer_dir, "tokenizer.json"), "rb").read())
    tok = TokenizerWrapper.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def _stream(tokenizer, ids, chunk_sizes, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas, pos = [], 0
    for size in chunk_sizes:
        deltas.append(detok.add_tokens(ids[pos:pos + size]))
        pos += size
    deltas.append(detok.add_tokens(ids[pos:], final=True))
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS + CORPUS)
def test_detokenizer_valid_text_never_splits_characters(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(tokenizer, ids, [1] * len(ids))
    assert "".join(deltas) == hf_tokenizer.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=200, deadline=None, database=None)
@given(data=st.data())
def test_detokenizer_random_tokens_match_full_decode(tokenizer, hf_tokenizer, data):
    # Random ids (partial UTF-8 byte tokens, special tokens) in random chunks: the deltas add up to
    # the full decode, and the text emitted so far is always a prefix of it.
    vocab = tokenizer.vocab_size
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=0, max_size=40))
    chunks = data.draw(st.lists(st.integers(0, 4), max_size=len(ids)))
    skip = data.draw(st.booleans())
    deltas = _stream(tokenizer, ids, chunks, skip_special_tokens=skip)
    full = hf_tokenizer.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == full
    emitted = ""
    for delta in deltas[:-1]:
        emitted += delta
        assert full.startswith(emitted)


def test_detokenizer_emoji_held_until_complete(tokenizer):
    ids = tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) >= 2, "the fixture should split the emoji over several tokens"
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.add_tokens([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add_tokens(ids[-1:]) == "😀"


def test_detokenizer_random_corpus_slices(tokenizer):
    rng = random.Random(0)
    text = "".join(CORPUS)
    for _ in range(50):
        start = rng.randrange(len(text))
        piece = text[start:start + rng.randrange(1, 60)]
        ids = tokenizer.encode(piece, add_special_tokens=False)
        chunks = [rng.randrange(1, 4) for _ in ids]
        assert "".join(_stream(tokenizer, ids, chunks)) == piece
