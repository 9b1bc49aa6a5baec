"""The data pipeline: tokenised once and cached by content, packed windows, assistant-only targets, shuffle, shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mlc.commands.train.batches import PackedSamples, SampleOrder, micro_batch_positions
from mlc.commands.train.tokens import tokenize_file, tokenizer_hash
from mlc.models.tokenizer import load_tokenizer

from .conftest import DATA

TOK = DATA / "tiny"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_CACHE", str(tmp_path / "cache"))


def tokens_of(path: Path, mode: str = "pretrain"):
    return tokenize_file(path, mode, load_tokenizer(TOK), tokenizer_hash(TOK), 2048)


def test_text_is_tokenised_once_and_cached_by_content(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("The first document.\n\nIts second paragraph.\n\n\nThe second one,\nover two lines.\n")
    first = tokens_of(text)
    stamp = (first.path / "tokens.bin").stat().st_mtime_ns
    again = tokens_of(text)
    assert again.path == first.path and (again.path / "tokens.bin").stat().st_mtime_ns == stamp
    tok = load_tokenizer(TOK)
    eos = tok.eos_token_id
    # Two blank lines end a document; one is a paragraph break that stays in it.
    expected = tok.encode("The first document.\n\nIts second paragraph.") + [eos] + tok.encode("The second one,\nover two lines.") + [eos]
    assert list(first.tokens) == expected and set(first.mask.tolist()) == {1}
    text.write_text("Something else.\n")
    assert tokens_of(text).path != first.path


def test_windows_overlap_by_one_token_so_every_token_is_a_target_once(tmp_path):
    data = tokens_of(DATA / "corpus" / "eval.txt")
    samples = PackedSamples(data, 16)
    assert len(samples) == (len(data) - 1) // 16
    x, y, mask = samples.batch([0, 3])
    tokens = np.asarray(data.tokens, dtype=np.int64)
    assert x[1].tolist() == tokens[48:64].tolist() and y[1].tolist() == tokens[49:65].tolist()
    train, held_out = samples.split(0.1)
    assert len(held_out) == round(len(samples) * 0.1) and len(train) + len(held_out) == len(samples)
    assert held_out.batch([0])[0][0].tolist() == samples.batch([len(train)])[0][0].tolist()


def test_sft_targets_are_the_assistant_replies_only(tmp_path):
    conversations = [json.loads(line) for line in (DATA / "corpus" / "chat_train.jsonl").read_text().splitlines()[:5]]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in conversations))
    data = tokens_of(path, "sft")
    tok = load_tokenizer(TOK)
    targets = tok.decode([t for t, m in zip(data.tokens.tolist(), data.mask.tolist()) if m])
    # The tiny ChatML template writes each reply as <|im_start|>assistant\n{content}<|im_end|>\n; the model learns
    # the content and the end-of-turn marker, never the user's words.
    expected = "".join(m["content"] + "<|im_end|>\n" for c in conversations for m in c["messages"] if m["role"] == "assistant")
    assert targets == expected
    everything = tok.decode(data.tokens.tolist())
    assert everything.count("<|im_start|>user\n") == sum(1 for c in conversations for m in c["messages"] if m["role"] == "user")


def test_shuffle_is_a_seeded_permutation_per_epoch():
    order = SampleOrder(50, seed=3)
    epoch0 = [order[i] for i in range(50)]
    epoch1 = [order[i] for i in range(50, 100)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    assert [SampleOrder(50, seed=3)[i] for i in range(100)] == epoch0 + epoch1
    assert [SampleOrder(50, seed=4)[i] for i in range(50)] != epoch0


@pytest.mark.parametrize("world, micro_batch", [(1, 8), (1, 2), (2, 4), (4, 1)])
def test_each_step_reads_the_same_global_positions_on_any_world_size(world, micro_batch):
    batch = 8
    accum = batch // (micro_batch * world)
    for step in range(3):
        read = [p for m in range(accum) for r in range(world) for p in micro_batch_positions(step, m, r, world, micro_batch, batch)]
        assert sorted(read) == list(range(step * batch, (step + 1) * batch))
