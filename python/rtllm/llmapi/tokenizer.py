"""Tokenizer: HF `tokenizers` (tokenizer.json) plus tokenizer_config.json (special tokens, chat
template). Its incremental detokenizer lives in rtllm.executor.detokenizer."""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Optional, Sequence, Union

from tokenizers import Tokenizer

# The files from_pretrained reads; an engine build copies each (rtllm.builder.engine.TOKENIZER_FILES).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def _token_content(token) -> Optional[str]:
    # tokenizer_config.json stores special tokens as a string or as an AddedToken dict.
    if isinstance(token, dict):
        return token.get("content")
    return token


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class TokenizerWrapper:
    """Text <-> token ids for one model directory (or tokenizer directory)."""

    def __init__(self, tokenizer: Tokenizer, config: Optional[dict] = None,
                 generation_config: Optional[dict] = None):
        self._tokenizer = tokenizer
        self.config = dict(config or {})
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.pad_token = _token_content(self.config.get("pad_token"))
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        self.add_eos_token = bool(self.config.get("add_eos_token", False))
        self.chat_template = self._pick_chat_template(self.config.get("chat_template"))
        self._generation_config = dict(generation_config or {})
        self._chat_env = None

    @classmethod
    def from_pretrained(cls, path: str) -> "TokenizerWrapper":
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise ValueError(f"no tokenizer.json in {path!r}: pass tokenizer=<dir with tokenizer.json> "
                             "or skip_tokenizer_init=True")
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = _read_json(os.path.join(path, "special_tokens_map.json"))
        for key in ("bos_token", "eos_token", "pad_token"):
            config.setdefault(key, special.get(key))
        template_file = os.path.join(path, "chat_template.jinja")
        if "chat_template" not in config and os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                config["chat_template"] = f.read()
        generation_config = _read_json(os.path.join(path, "generation_config.json"))
        return cls(Tokenizer.from_file(tokenizer_file), config, generation_config)

    @staticmethod
    def _pick_chat_template(template) -> Optional[str]:
        # Some configs hold a list of named templates; "default" is the chat one.
        if isinstance(template, list):
            named = {t["name"]: t["template"] for t in template}
            return named.get("default", next(iter(named.values()), None))
        return template

    # Vocabulary and special ids.

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def bos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> Optional[int]:
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> Optional[int]:
        return self.token_to_id(self.pad_token)

    @property
    def eos_token_ids(self) -> list:
        """End-of-sequence ids: generation_config.json's eos_token_id (int or list), else eos_token's."""
        ids = self._generation_config.get("eos_token_id")
        if ids is None:
            ids = self.eos_token_id
        if ids is None:
            return []
        return [ids] if isinstance(ids, int) else list(ids)

    # Encode / decode.

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        # encode_batch releases the GIL while it works (encode does not): a long prompt encoded in a
        # server's worker thread then leaves its event loop running.
        ids = self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens:
            # tokenizer.json's post-processor may already add them; tokenizer_config.json asks for them.
            bos, eos = self.bos_token_id, self.eos_token_id
            if self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if self.add_eos_token and eos is not None and (not ids or ids[-1] != eos):
                ids = ids + [eos]
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    # Chat template.

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, chat_template: Optional[str] = None,
                            **kwargs) -> Union[str, list]:
        """Renders `messages` with the model's jinja2 chat template, as HF's apply_chat_template.

        Returns the prompt text, or its token ids with tokenize=True (without adding a second bos:
        templates write their own special tokens).
        """
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat_template (tokenizer_config.json 'chat_template')")
        env = self._jinja_env()
        text = env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
            pad_token=self.pad_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _jinja_env(self):
        if self._chat_env is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise ValueError(f"chat template error: {message}")

            def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                                  separators=separators, sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._chat_env = env
        return self._chat_env
