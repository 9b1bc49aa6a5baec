"""Preference pairs for DPO: reading, tokenising (cached like the other token files) and batching.

A line of the JSONL file is one pair, in one of three shapes (TRL's):
    {"prompt": "text", "chosen": "text", "rejected": "text"}                  plain text, no chat template
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}      chat: the template renders them
    {"chosen": [messages], "rejected": [messages]}                            chat, the prompt is the shared start
Each pair becomes two sequences, prompt + chosen and prompt + rejected; only the response's tokens are targets
(with a plain-text pair the tokenizer's end-of-sequence token ends the response). A sequence longer than
data.seq_len + 1 tokens keeps the end of its prompt and the start of its response.

Cache layout (under the mlc cache, keyed like train-tokens):
    train-pairs/<key>/tokens.bin  mask.bin  offsets.bin (int64, 2N + 1: sequence j is tokens[offsets[j]:offsets[j+1]])
                      meta.json   written last
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from mlc.commands.train.tokens import Tokenizer
from mlc.errors import InputError
from mlc.paths import cache_dir
from mlc.runs.hashing import file_sha256

FORMAT_VERSION = 1
PAD = 0  # any id: padded positions are never targets and, with causal attention, never seen by real tokens


@dataclass
class PreferencePairs:
    """Pairs [first, first + count) of a tokenised preference file; `reference` holds their reference log-probs."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    first: int = 0
    count: int = -1
    reference: torch.Tensor | None = field(default=None, repr=False)  # [len(self), 2]: chosen, rejected

    def __post_init__(self) -> None:
        if self.count < 0:
            self.count = (len(self.offsets) - 1) // 2 - self.first

    def __len__(self) -> int:
        return self.count

    def split(self, fraction: float) -> tuple["PreferencePairs", "PreferencePairs"]:
        """(train, validation): the last `fraction` of the pairs are held out."""
        n_val = int(round(self.count * fraction))
        if fraction > 0 and self.count > 1:
            n_val = max(1, n_val)
        head = PreferencePairs(self.tokens, self.mask, self.offsets, self.first, self.count - n_val)
        return head, PreferencePairs(self.tokens, self.mask, self.offsets, self.first + self.count - n_val, n_val)

    def sequence(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[j], self.offsets[j + 1]
        return np.asarray(self.tokens[a:b]), np.asarray(self.mask[a:b])

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        """(inputs, targets, mask) of 2m rows (the m chosen sequences, then the m rejected ones), right-padded to the
        longest; with reference log-probs, a fourth tensor [m, 2] of them."""
        rows = [self.sequence(2 * (self.first + i) + side) for side in (0, 1) for i in indices]
        width = max(len(ids) for ids, _ in rows) - 1
        inputs = torch.full((len(rows), width), PAD, dtype=torch.long)
        targets = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for r, (ids, m) in enumerate(rows):
            n = len(ids) - 1
            inputs[r, :n] = torch.from_numpy(ids[:-1].astype(np.int64))
            targets[r, :n] = torch.from_numpy(ids[1:].astype(np.int64))
            mask[r, :n] = torch.from_numpy(m[1:].astype(np.bool_))
        if self.reference is None:
            return inputs, targets, mask
        return inputs, targets, mask, self.reference[torch.tensor(indices)]

    def units(self, batch: tuple[torch.Tensor, ...]) -> int:
        """What a global batch is averaged over: pairs."""
        return batch[0].shape[0] // 2


# ---- reading -------------------------------------------------------------------------------------------------
def _pairs(path: Path, tokenizer: Tokenizer) -> Iterator[tuple[str, str, str, bool]]:
    """(prompt, chosen, rejected, is_chat) as text, per line."""
    for lineno, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{lineno}: not valid JSON", "preference data is JSONL, one pair per line") from None
        yield (*_render(record, tokenizer, f"{path}:{lineno}"),)


def _render(record: Any, tokenizer: Tokenizer, where: str) -> tuple[str, str, str, bool]:
    hint = 'each line needs "chosen" and "rejected", and "prompt" unless they are chat messages with a shared start'
    if not isinstance(record, dict) or "chosen" not in record or "rejected" not in record:
        raise InputError(f"{where}: expected an object with \"chosen\" and \"rejected\"", hint)
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if all(isinstance(x, str) for x in (prompt, chosen, rejected)):
        return prompt, chosen, rejected, False
    if not (_is_messages(chosen) and _is_messages(rejected) and (prompt is None or _is_messages(prompt))):
        raise InputError(f"{where}: \"prompt\", \"chosen\" and \"rejected\" must all be strings or all chat messages", hint)
    if prompt is None:  # the prompt is what the two conversations share
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not prompt or not chosen or not rejected or chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
        raise InputError(f"{where}: the chosen and rejected replies must be assistant turns after a non-empty prompt", hint)
    start = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    texts = []
    for reply in (chosen, rejected):
        full = tokenizer.apply_chat_template(prompt + reply, add_generation_prompt=False)
        if not full.startswith(start):
            raise InputError("the chat template does not render a conversation's prompt as its prefix", "DPO needs a template whose prompt rendering starts the full rendering")
        texts.append(full[len(start):])
    return start, texts[0], texts[1], True


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _sequence(prompt: list[int], response: list[int], limit: int) -> tuple[list[int], list[int]]:
    """prompt + response cut to `limit` tokens: the end of the prompt and the start of the response are kept."""
    if len(prompt) + len(response) > limit:
        keep_response = min(len(response), max(limit - len(prompt), limit // 2))
        response = response[:keep_response]
        prompt = prompt[len(prompt) - (limit - keep_response):] if limit > keep_response else []
    return prompt + response, [0] * len(prompt) + [1] * len(response)


# ---- tokenising ----------------------------------------------------------------------------------------------
def tokenize_pairs(path: Path, tokenizer: Tokenizer, tok_hash: str, vocab_size: int, seq_len: int) -> PreferencePairs:
    """The tokenised pairs of `path`, from the cache or tokenised now."""
    key = hashlib.sha256(f"{FORMAT_VERSION}|{seq_len}|{file_sha256(path)}|{tok_hash}".encode()).hexdigest()[:24]
    out = cache_dir() / "train-pairs" / key
    if not (out / "meta.json").is_file():
        _write(path, tokenizer, vocab_size, seq_len, out)
    meta = json.loads((out / "meta.json").read_text())
    dtype, n = np.dtype(meta["dtype"]), meta["tokens"]
    tokens = np.memmap(out / "tokens.bin", dtype=dtype, mode="r", shape=(n,))
    mask = np.memmap(out / "mask.bin", dtype=np.uint8, mode="r", shape=(n,))
    offsets = np.fromfile(out / "offsets.bin", dtype=np.int64)
    return PreferencePairs(tokens, mask, offsets)


def _write(path: Path, tokenizer: Tokenizer, vocab_size: int, seq_len: int, out: Path) -> None:
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    offsets, total, pairs = [0], 0, 0
    eos = tokenizer.eos_token_id
    with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
        for prompt, chosen, rejected, is_chat in _pairs(path, tokenizer):
            # Plain text: the prompt gets the tokenizer's own BOS (if any) and each response ends with EOS; a chat
            # template writes its own markers.
            prompt_ids = tokenizer.encode(prompt, add_special_tokens=not is_chat)
            for response in (chosen, rejected):
                ids = tokenizer.encode(response, add_special_tokens=False)
                if not is_chat and eos is not None:
                    ids.append(eos)
                seq, target = _sequence(prompt_ids, ids, seq_len + 1)
                ft.write(np.asarray(seq, dtype=dtype).tobytes())
                fm.write(np.asarray(target, dtype=np.uint8).tobytes())
                total += len(seq)
                offsets.append(total)
            pairs += 1
    np.asarray(offsets, dtype=np.int64).tofile(tmp / "offsets.bin")
    if pairs == 0:
        shutil.rmtree(tmp)
        raise InputError(f"{path} holds no preference pairs", "give JSONL lines with prompt/chosen/rejected")
    meta = {"source": str(path), "pairs": pairs, "tokens": total, "dtype": np.dtype(dtype).name, "seq_len": seq_len}
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
    try:
        os.replace(tmp, out)
    except OSError:  # another process finished the same file first
        shutil.rmtree(tmp, ignore_errors=True)
