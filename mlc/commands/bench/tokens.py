"""The model's tokenizer for counting and making prompts, read straight from tokenizer.json.

The `tokenizers` library alone (not mlc.models, which imports torch): `mlc bench serve` against a
remote server stays torch-free even when it counts tokens itself.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlc.errors import InputError


class TokenCounter:
    """Encode and decode text with one tokenizer.json; knows its vocabulary and special tokens."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.path = path
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exceptions for malformed files
            raise InputError(f"{path} is not a readable tokenizer.json ({str(e).splitlines()[0][:120]})", "give a model directory or its tokenizer.json") from None
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens", [])
        self.special_ids = sorted({t["id"] for t in added if t.get("special")})
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        # Tokens the post-processor adds to every encoded text (a BOS, say): a server that tokenizes a text
        # prompt adds them too, so random prompts are made that much shorter (as vLLM does).
        self.num_special_to_add = len(self.backend.encode("", add_special_tokens=True).ids) - len(self.backend.encode("", add_special_tokens=False).ids)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def count(self, text: str, special: bool = False) -> int:
        """Tokens in text; special=True adds what the tokenizer adds to a whole prompt (a BOS, say), as a server does."""
        return len(self.backend.encode(text, add_special_tokens=special).ids)

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def load_counter(ref: str, runs_root: Path) -> TokenCounter:
    """A tokenizer from a model directory, a tokenizer.json, or a run reference to a model."""
    from mlc.runs.refs import resolve

    path = resolve(ref, runs_root).path
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"no tokenizer.json in {path}", "give a model directory with a tokenizer.json, or the file itself")
    return TokenCounter(file)
