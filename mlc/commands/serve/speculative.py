"""Draft tokens by n-gram prompt lookup (no draft model): the tokens that followed the latest earlier occurrence of a
sequence's last n tokens (n from MAX_NGRAM down to 1), in its prompt or its output so far.

Why it works: when a reply copies from its prompt (summaries, edits, code changes, quoting), the text after a match
in the prompt is very often what comes next. How the engine uses the drafts and why the output distribution is
unchanged: see Engine._verify.

Each sequence keeps an index from n-gram to the position after its latest occurrence, extended as tokens arrive,
so a lookup costs O(MAX_NGRAM) dict operations per step instead of a scan of the whole context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NGRAM = 3


@dataclass
class NgramIndex:
    """For n = 1..MAX_NGRAM: n-gram -> the position just after its latest occurrence that ends before the last token."""

    by_n: dict[int, dict[tuple[int, ...], int]] = field(default_factory=lambda: {n: {} for n in range(1, MAX_NGRAM + 1)})
    indexed: int = 0  # n-grams ending at positions below this are in by_n

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k draft tokens to follow `tokens`, or none when no suffix of it occurred before."""
        end = len(tokens)
        for e in range(self.indexed + 1, end):  # index n-grams ending before the last token (the suffix itself is looked up)
            for n, table in self.by_n.items():
                if e >= n:
                    table[tuple(tokens[e - n : e])] = e
        self.indexed = max(self.indexed, end - 1)
        for n in range(min(MAX_NGRAM, end - 1), 0, -1):
            after = self.by_n[n].get(tuple(tokens[end - n :]))
            if after is not None:
                return tokens[after : after + k]
        return []
