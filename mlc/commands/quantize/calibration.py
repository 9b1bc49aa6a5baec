"""Calibration tokens: text or JSONL in, `samples` windows of `seq_len` tokens out.

Windows are spread evenly over the token stream. When the text holds fewer than samples x seq_len
tokens the windows overlap, but never by more than MAX_REUSE: a token is used at most twice on
average, otherwise the calibration statistics would be mostly copies of the same few sentences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError

MAX_REUSE = 2.0


def read_calibration_texts(path: Path) -> list[str]:
    """Documents from plain text (one document) or JSONL with a "text" field or chat "messages" per line."""
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist", "pass a .txt or .jsonl file with --calib")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n} is not valid JSON", "each line of a .jsonl file is one JSON object") from None
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            texts.append("\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict)))
        else:
            raise InputError(f"{path}:{n} has neither a 'text' string nor a 'messages' list", 'write lines like {"text": "..."}')
    if not texts:
        raise InputError(f"{path} holds no records", "give at least one line with a text field")
    return texts


def calibration_windows(token_ids: list[int], samples: int, seq_len: int, source: str) -> torch.Tensor:
    """[samples, seq_len] token windows spread evenly over the stream, or a one-line error if it is too short."""
    n = len(token_ids)
    need = samples * seq_len
    if n < seq_len or n * MAX_REUSE < need:
        raise InputError(
            f"calibration text {source} has {n} tokens, too short for {samples} samples of {seq_len} tokens "
            f"(needs at least {int(-(-need // MAX_REUSE))})",
            "give a longer --calib file, or fewer --samples or a shorter --seq-len",
        )
    ids = torch.tensor(token_ids, dtype=torch.long)
    starts = torch.linspace(0, n - seq_len, samples).round().long() if samples > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def load_calibration(path: Path, tokenizer: Any, samples: int, seq_len: int) -> torch.Tensor:
    """Tokenised calibration windows from a file, documents joined by a blank line."""
    texts = read_calibration_texts(path)
    return calibration_windows(tokenizer.encode("\n\n".join(texts)), samples, seq_len, str(path))
