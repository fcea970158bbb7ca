"""IncrementalDetokenizer: token ids -> text deltas that never split a UTF-8 character.

It lives beside the results it fills (rtllm.executor.result); the tokenizer it is given is any object
with decode(ids, skip_special_tokens) (rtllm.llmapi.TokenizerWrapper).
"""
from __future__ import annotations

from typing import Sequence

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window: tokens[prefix_offset:read_offset] were already emitted, tokens after
    read_offset are new. Text is emitted only when the window's text grew and does not end in
    U+FFFD (the decoder's mark for an incomplete UTF-8 sequence); until then the tokens wait.
    Both offsets only move to points where the decoded bytes end on a character boundary, so the
    window's text extends the full decode exactly.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add_tokens(self, new_token_ids: Sequence[int], final: bool = False) -> str:
        """Appends tokens and returns the newly complete text (all the rest when `final`)."""
        self.token_ids.extend(new_token_ids)
        window = self.token_ids[self._prefix_offset:]
        prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(window)
        if len(window_text) <= len(prefix_text):
            return ""
        if window_text.endswith(_REPLACEMENT_CHAR) and not final:
            return ""
        delta = window_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta
