"""Calibration tokens: text or JSONL in, `samples` windows of `seq_len` tokens out.

Windows are spread evenly over the token stream. When the text holds fewer than samples x seq_len
tokens the windows overlap, but never by more than MAX_REUSE: a token is used at most twice on
average, otherwise the calibration statistics would be mostly copies of the same few sentences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError
from mlc.io.texts import read_texts

MAX_REUSE = 2.0


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
    texts = read_texts(path, option="--calib", chat=True)
    return calibration_windows(tokenizer.encode("\n\n".join(texts)), samples, seq_len, str(path))
