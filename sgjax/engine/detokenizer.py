"""Incremental detokenization that never emits half a UTF-8 character.

Decoding token by token breaks multi-byte characters and merges (a space before a word), so each new
piece is the difference between decoding a short window of recent tokens with and without the new
ones; while that difference ends in U+FFFD (an incomplete byte sequence) it is held back.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: decoded for context only
        self.read_offset = 0  # tokens before this are already in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly complete text (possibly empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        after = self._decode(self.ids[self.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """At the end of a request: whatever is left, replacement characters included."""
        before = self._decode(self.ids[self.prefix_offset:self.read_offset])
        rest = self._decode(self.ids[self.prefix_offset:])[len(before):]
        self.read_offset = len(self.ids)
        self.text += rest
        return rest
