"""The workloads: lengths as asked (checked with transformers' tokenizer), shared prefixes, ShareGPT's filters."""

from __future__ import annotations

import json
import math

import pytest

from mlc import data
from mlc.commands.bench.datasets import DatasetOptions, load_samples
from mlc.commands.bench.tokens import TokenCounter


@pytest.fixture(scope="module")
def tok() -> TokenCounter:
    return TokenCounter(data.tiny_model_dir() / "tokenizer.json")


@pytest.fixture(scope="module")
def hf():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(data.tiny_model_dir() / "tokenizer.json"))


def test_random_prompts_re_encode_to_their_lengths_within_the_range(tok, hf):
    opts = DatasetOptions("random", input_len=64, output_len=20, range_ratio=0.25, seed=3)
    samples = load_samples(opts, 40, tok, chat=False)
    lengths = [len(hf(s.prompt, add_special_tokens=False).input_ids) for s in samples]
    assert all(math.floor(64 * 0.75) <= n <= math.ceil(64 * 1.25) for n in lengths)
    assert sum(n == s.prompt_len for n, s in zip(lengths, samples)) >= 36  # a few token strings never settle, as in vLLM
    assert all(15 <= s.output_len <= 25 for s in samples) and len({s.output_len for s in samples}) > 3
    assert [s.prompt for s in load_samples(opts, 40, tok, chat=False)] == [s.prompt for s in samples]  # the seed repeats it


def test_prefix_repetition_shares_each_prefix_among_its_prompts(tok, hf):
    opts = DatasetOptions("prefix-repetition", prefix_len=32, suffix_len=16, num_prefixes=3, output_len=8, seed=1)
    samples = load_samples(opts, 12, tok, chat=False)
    ids = [hf(s.prompt, add_special_tokens=False).input_ids for s in samples]
    prefixes = {tuple(i[:32]) for i in ids}
    assert len(samples) == 12 and len(prefixes) == 3
    assert sorted(sum(tuple(i[:32]) == p for i in ids) for p in prefixes) == [4, 4, 4]
    assert len({tuple(i[32:]) for i in ids}) == 12  # every suffix differs
    assert all(s.output_len == 8 for s in samples)


def test_sharegpt_asks_for_the_answers_length_and_skips_what_vllm_skips(tok, hf, tmp_path):
    long = "word " * 1500
    conversations = [
        {"conversations": [{"from": "human", "value": "Tell me about the sea and the sky."}, {"from": "gpt", "value": "The sea is wide and the sky is blue."}]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A short prompt is skipped."}]},
        {"conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "A prompt over 1024 tokens is skipped."}]},
        {"conversations": [{"from": "human", "value": "Only one turn here."}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(conversations))
    samples = load_samples(DatasetOptions("sharegpt", path=path), 3, tok, chat=False)
    assert {s.prompt for s in samples} == {"Tell me about the sea and the sky."}  # the one usable prompt, repeated to 3
    assert samples[0].output_len == len(hf("The sea is wide and the sky is blue.").input_ids)
    assert samples[0].prompt_len == len(hf("Tell me about the sea and the sky.").input_ids)


def test_the_bundled_chat_corpus_sends_conversations_that_end_with_a_user_turn(tok):
    samples = load_samples(DatasetOptions("chat", output_len=16), 50, tok, chat=True)
    assert len(samples) == 50 and all(s.prompt[-1]["role"] == "user" for s in samples)
    assert all(m["role"] != "assistant" or i < len(s.prompt) - 1 for s in samples for i, m in enumerate(s.prompt))
    plain = load_samples(DatasetOptions("chat", output_len=16), 5, None, chat=False)
    assert all(isinstance(s.prompt, str) and s.prompt_len is None for s in plain)  # counted by the server's usage


def test_jsonl_without_output_len_asks_for_vllms_default(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    samples = load_samples(DatasetOptions("jsonl", path=path, shuffle=False), 2, tok, chat=False)
    assert [s.prompt for s in samples] == ["one", "two"] and all(s.output_len == 256 for s in samples)
