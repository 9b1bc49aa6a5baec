"""Incremental detokenisation of one generated sequence, with stop strings that may span tokens.

Decoding token by token breaks multi-byte characters and BPE word boundaries, so the text of a new
token is the difference between decoding a short window of recent tokens with and without it (the
window keeps the cost per token constant). A stop string is searched for in the text as it grows;
while streaming, the last len(longest stop) - 1 characters are held back, since they may turn out
to be the start of a stop string that the next tokens complete.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WINDOW = 6  # tokens of left context that make a token's text decode as it does inside the sequence


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out
        self._prefix = 0  # ids[_prefix:_read] decode to the tail of text already accounted for
        self._read = 0
        self.stopped_by: str | None = None

    def add(self, token: int) -> bool:
        """Append a token; True when the text now contains a stop string (the text is cut before it)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # an incomplete character: wait for the bytes that finish it
        old_len = len(self.text)
        self.text += after[len(before) :]
        self._read = len(self.ids)
        self._prefix = max(0, self._read - WINDOW)
        return self._find_stop(old_len)

    def _find_stop(self, old_len: int) -> bool:
        if not self.stop:
            return False
        begin = max(0, old_len - self.holdback)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, begin)) >= 0]
        if not hits:
            return False
        pos, self.stopped_by = min(hits)
        self.text = self.text[:pos]
        return True

    def take(self, final: bool) -> str:
        """The text not handed out yet; unless final, minus the tail that might begin a stop string."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
