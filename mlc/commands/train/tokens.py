"""Tokenise a text or chat-JSONL file once into a memory-mapped token file, cached by content hash.

The cache key is the file's sha256, the tokenizer's (tokenizer.json + chat template) and the mode, so editing the
data or swapping the tokenizer re-tokenises, and nothing else does. Layout under the mlc cache:

    train-tokens/<key>/tokens.bin   uint16 or uint32 token ids, documents joined back to back
                       mask.bin     uint8, 1 where the token is a training target (sft: assistant tokens only)
                       meta.json    written last: a directory without it is an unfinished tokenisation
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from mlc.errors import InputError
from mlc.paths import cache_dir
from mlc.runs.hashing import file_sha256

FORMAT_VERSION = 2


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str: ...


@dataclass
class TokenFile:
    """A tokenised file: token ids and the target mask, both memory-mapped."""

    tokens: np.ndarray
    mask: np.ndarray
    path: Path

    def __len__(self) -> int:
        return len(self.tokens)


def tokenizer_hash(tokenizer_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        f = tokenizer_dir / name
        if f.is_file():
            h.update(name.encode() + file_sha256(f).encode())
    return h.hexdigest()


def tokenize_file(path: Path, mode: str, tokenizer: Tokenizer, tok_hash: str, vocab_size: int) -> TokenFile:
    """The token file for `path`, tokenising it now unless the cache already holds it."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{mode}|{file_sha256(path)}|{tok_hash}".encode()).hexdigest()[:24]
    out = cache_dir() / "train-tokens" / key
    if not (out / "meta.json").is_file():
        _write_token_file(path, mode, tokenizer, vocab_size, out)
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    n = meta["tokens"]
    tokens = np.memmap(out / "tokens.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
    mask = np.memmap(out / "mask.bin", dtype=np.uint8, mode="r", shape=(n,)) if n else np.zeros(0, np.uint8)
    return TokenFile(tokens, mask, out)


def _write_token_file(path: Path, mode: str, tokenizer: Tokenizer, vocab_size: int, out: Path) -> None:
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = docs = 0
    with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
        pieces = _pretrain_pieces(path, tokenizer) if mode == "pretrain" else _sft_pieces(path, tokenizer)
        for ids, target in pieces:
            ft.write(np.asarray(ids, dtype=dtype).tobytes())
            fm.write(np.asarray(target, dtype=np.uint8).tobytes())
            count += len(ids)
            docs += 1
    meta = {"source": str(path), "mode": mode, "tokens": count, "documents": docs, "dtype": np.dtype(dtype).name}
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    if count == 0:
        shutil.rmtree(tmp)
        raise InputError(f"{path} holds no {'text' if mode == 'pretrain' else 'conversations'}", "check the file, or data.mode")
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same file first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def _documents(path: Path) -> Iterator[str]:
    """Documents of a text file (separated by two or more blank lines) or of a JSONL file with a "text" field per line.

    A single blank line is a paragraph break inside a document and stays in the text, as `mlc eval` reads it:
    a model trained here and evaluated there sees the same paragraph structure.
    """
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(path.open(encoding="utf-8"), 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise InputError(f"{path}:{lineno}: expected a JSON object with a \"text\" field", "pretraining JSONL needs {\"text\": ...} per line") from None
        return
    lines: list[str] = []
    blank_run = 0
    for line in path.open(encoding="utf-8"):
        if line.strip():
            if blank_run >= 2 and lines:
                yield "".join(lines).strip("\n")
                lines = []
            elif blank_run == 1 and lines:
                lines.append("\n")
            lines.append(line)
            blank_run = 0
        else:
            blank_run += 1
    if lines:
        yield "".join(lines).strip("\n")


def _pretrain_pieces(path: Path, tokenizer: Tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    for doc in _documents(path):
        ids = tokenizer.encode(doc)  # with the tokenizer's own BOS, if its post-processor adds one
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        yield ids, [1] * len(ids)


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with its end-of-turn marker).

    A reply's span runs from the end of the prompt rendered with add_generation_prompt to the end of the
    conversation rendered through that reply: whatever the template, exactly what the model must generate.
    """
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        start, end = len(prompt), len(through)
        if not (full.startswith(through) and through.startswith(prompt)):
            raise InputError("the chat template does not render conversations prefix by prefix", "assistant-only loss needs a template whose renderings of a conversation's prefixes are prefixes of it")
        spans.append((start, end))
    return full, spans


def _sft_pieces(path: Path, tokenizer: Tokenizer) -> Iterator[tuple[list[int], list[int]]]:
    for lineno, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            assert isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise InputError(f"{path}:{lineno}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}", "SFT data is chat JSONL, one conversation per line") from None
        text, spans = assistant_spans(tokenizer, messages)
        if not spans:
            continue  # nothing to learn from a conversation without a reply
        ids: list[int] = []
        target: list[int] = []
        # Tokenise the segments separately, so each token is wholly prompt or wholly reply; segment boundaries
        # sit at the template's turn markers, where the tokenizer would split anyway.
        cursor = 0
        for start, end in spans:
            for piece, is_reply in ((text[cursor:start], 0), (text[start:end], 1)):
                if piece:
                    piece_ids = tokenizer.encode(piece, add_special_tokens=False)
                    ids += piece_ids
                    target += [is_reply] * len(piece_ids)
            cursor = end
        if cursor < len(text):
            tail = tokenizer.encode(text[cursor:], add_special_tokens=False)
            ids += tail
            target += [0] * len(tail)
        yield ids, target
