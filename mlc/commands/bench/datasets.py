"""Benchmark workloads: each gives a list of prompts with their prompt length and how many tokens to ask for.

    random             synthetic token sequences of --input-len/--output-len tokens, spread by --range-ratio
    chat               mlc's bundled chat corpus (mlc/data/corpus/chat_*.jsonl): real questions, real answers
    sharegpt           a ShareGPT-format JSON file (a list of {"conversations": [{"value": ...}, ...]})
    jsonl              a JSONL file, one {"prompt": "..."} (or {"messages": [...]}) per line
    prefix-repetition  --num-prefixes shared prefixes of --prefix-len tokens, each followed by different
                       suffixes of --suffix-len tokens: exercises prefix caching

As in vLLM (vllm/benchmarks/datasets/): random prompts are token sequences offset per request,
decoded to text and re-encoded so the server sees the intended length (less the special tokens it adds);
lengths are drawn uniformly from [floor(L(1-r)), ceil(L(1+r))]; ShareGPT takes each conversation's
first two turns, asks for as many tokens as the reference answer had (or --output-len) and skips
prompts or answers under 4 tokens, prompts over 1024 and pairs over 2048; file datasets are shuffled
with --seed (unless --no-shuffle) and repeated at random when they have fewer prompts than --num-prompts.
Differences: prefix-repetition gives exactly --num-prompts prompts (prefixes assigned in turn, then
shuffled; vLLM gives num_prompts // num_prefixes per prefix) and draws its tokens from the
non-special tokens only; jsonl prompts are sent as written (vLLM renders its `custom` prompts with
the chat template first: use --endpoint chat to have the server do that).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlc.commands.bench.tokens import TokenCounter
from mlc.errors import InputError, MlcUsageError

DATASETS = ("random", "chat", "sharegpt", "jsonl", "prefix-repetition")
Prompt = str | list[dict[str, Any]]  # text, or chat messages


@dataclass
class Sample:
    prompt: Prompt
    prompt_len: int | None  # tokens by the local tokenizer; None without one (the server's usage then counts)
    output_len: int


@dataclass
class DatasetOptions:
    name: str = "random"
    path: Path | None = None
    input_len: int = 1024
    output_len: int | None = None  # None: each dataset's default (random 128, files: the reference answer's length)
    range_ratio: float = 0.0
    prefix_len: int = 256
    suffix_len: int = 256
    num_prefixes: int = 10
    seed: int = 0
    shuffle: bool = True  # file datasets: shuffled with the seed (vLLM's default), else in file order


def load_samples(opts: DatasetOptions, n: int, tok: TokenCounter | None, chat: bool) -> list[Sample]:
    """n samples of the named dataset; raises InputError for unreadable files and MlcUsageError for bad options."""
    if opts.name not in DATASETS:
        raise MlcUsageError(f"unknown dataset {opts.name!r}", f"choose one of {', '.join(DATASETS)}")
    if opts.name in ("sharegpt", "jsonl") and opts.path is None:
        raise MlcUsageError(f"--dataset {opts.name} needs --dataset-path FILE", "give the file to read prompts from")
    if opts.name in ("random", "chat", "prefix-repetition") and opts.path is not None:
        raise MlcUsageError(f"--dataset {opts.name} takes no --dataset-path", "use --dataset sharegpt or jsonl for a file")
    if opts.output_len is not None and opts.output_len < 1:
        raise MlcUsageError("--output-len must be at least 1", "ask for one token or more")
    if opts.name == "random":
        return random_samples(opts, n, _need(tok, "random"))
    if opts.name == "prefix-repetition":
        return prefix_repetition_samples(opts, n, _need(tok, "prefix-repetition"))
    if opts.name == "sharegpt":
        pairs = read_sharegpt(opts.path)
    else:
        from mlc import data

        files = [opts.path] if opts.name == "jsonl" else [data.chat_train_path(), data.chat_eval_path()]
        pairs = [p for f in files for p in read_jsonl(f)]
    return conversation_samples(pairs, opts, n, tok, chat, strict_lengths=opts.name == "sharegpt")


def _need(tok: TokenCounter | None, name: str) -> TokenCounter:
    if tok is None:
        raise MlcUsageError(
            f"--dataset {name} makes prompts from token ids, so it needs the model's tokenizer",
            "give --tokenizer PATH (a model directory or tokenizer.json), or serve an mlc model with --server/--model-ref",
        )
    return tok


def _lengths(rng: np.random.Generator, n: int, mean: int, ratio: float, low_floor: int) -> np.ndarray:
    low, high = max(math.floor(mean * (1 - ratio)), low_floor), max(math.ceil(mean * (1 + ratio)), low_floor)
    return rng.integers(low, high + 1, size=n)


def _text_of_length(tok: TokenCounter, ids: list[int], target: int, allowed: np.ndarray, rng: np.random.Generator) -> tuple[str, int]:
    """Text that re-encodes to `target` tokens where a few rounds of trimming and padding can get it there."""
    for _ in range(10):
        text = tok.decode(ids)
        again = tok.encode(text)
        if len(again) == target:
            return text, target
        ids = again[:target] if len(again) > target else again + allowed[rng.integers(0, len(allowed), target - len(again))].tolist()
    return text, len(again)  # some token strings never settle; the prompt is then a token or two off, as in vLLM


def _allowed(tok: TokenCounter) -> np.ndarray:
    return np.setdiff1d(np.arange(tok.vocab_size), np.array(tok.special_ids, dtype=np.int64))


def random_samples(opts: DatasetOptions, n: int, tok: TokenCounter) -> list[Sample]:
    if not 0.0 <= opts.range_ratio < 1.0:
        raise MlcUsageError(f"--range-ratio {opts.range_ratio} is outside [0, 1)", "0 gives every request the same lengths")
    real_input = max(0, opts.input_len - tok.num_special_to_add)
    if math.floor(real_input * (1 - opts.range_ratio)) < 1:
        raise MlcUsageError(f"--input-len {opts.input_len} leaves no prompt tokens", "ask for a longer input")
    rng = np.random.default_rng(opts.seed)
    input_lens = _lengths(rng, n, real_input, opts.range_ratio, 1)
    output_lens = _lengths(rng, n, opts.output_len or 128, opts.range_ratio, 1)
    offsets = rng.integers(0, tok.vocab_size, size=n)
    allowed = _allowed(tok)
    samples = []
    for i in range(n):
        ids = allowed[(offsets[i] + i + np.arange(input_lens[i])) % len(allowed)].tolist()
        text, length = _text_of_length(tok, ids, int(input_lens[i]), allowed, rng)
        samples.append(Sample(text, length + tok.num_special_to_add, int(output_lens[i])))
    return samples


def prefix_repetition_samples(opts: DatasetOptions, n: int, tok: TokenCounter) -> list[Sample]:
    if opts.num_prefixes < 1 or opts.num_prefixes > n:
        raise MlcUsageError(f"--num-prefixes {opts.num_prefixes} must be between 1 and --num-prompts {n}", "every prefix needs a prompt")
    rng = np.random.default_rng(opts.seed)
    allowed = _allowed(tok)

    def tokens(length: int) -> list[int]:
        return _text_ids(tok, allowed[rng.integers(0, len(allowed), length)].tolist(), length, allowed, rng)

    prefixes = [tokens(opts.prefix_len) for _ in range(opts.num_prefixes)]
    samples = []
    for i in range(n):
        ids = prefixes[i % opts.num_prefixes] + tokens(opts.suffix_len)
        samples.append(Sample(tok.decode(ids), len(ids) + tok.num_special_to_add, opts.output_len or 128))
    order = rng.permutation(n)
    return [samples[i] for i in order]


def _text_ids(tok: TokenCounter, ids: list[int], target: int, allowed: np.ndarray, rng: np.random.Generator) -> list[int]:
    text, _ = _text_of_length(tok, ids, target, allowed, rng)
    return tok.encode(text)


# ---------------------------------------------------------------- files
@dataclass
class Pair:
    """A prompt (text, or the chat messages before the answer) and the reference answer, if known."""

    text: str
    messages: list[dict[str, Any]]
    answer: str | None


def read_sharegpt(path: Path) -> list[Pair]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise InputError(f"{path} is not a ShareGPT file: the top level is not a list", 'expected [{"conversations": [{"from": "human", "value": ...}, ...]}, ...]')
    pairs = []
    for i, entry in enumerate(data):
        conv = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(conv, list):
            raise InputError(f"{path}: entry {i} has no 'conversations' list", 'each entry needs {"conversations": [{"value": ...}, ...]}')
        if len(conv) < 2:
            continue  # as vLLM: only conversations with a prompt and an answer
        try:
            prompt, answer = str(conv[0]["value"]), str(conv[1]["value"])
        except (KeyError, TypeError):
            raise InputError(f"{path}: entry {i}'s first turns have no 'value'", "each turn is {\"from\": ..., \"value\": text}") from None
        pairs.append(Pair(prompt, [{"role": "user", "content": prompt}], answer))
    if not pairs:
        raise InputError(f"{path} holds no conversation with two turns", "a ShareGPT entry needs a prompt and an answer")
    return pairs


def read_jsonl(path: Path) -> list[Pair]:
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"dataset file {path} does not exist", "check --dataset-path") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path} is not a UTF-8 text file", "give a JSONL file, one JSON object a line") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not JSON ({e.msg})", "one JSON object a line") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str):
            pairs.append(Pair(row["prompt"], [{"role": "user", "content": row["prompt"]}], None))
        elif isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]:
            pairs.append(_conversation(row["messages"], path, n))
        else:
            raise InputError(f"{path} line {n} has neither a 'prompt' string nor a 'messages' list", 'write {"prompt": "..."} or {"messages": [...]}')
    if not pairs:
        raise InputError(f"{path} holds no prompts", 'write one {"prompt": "..."} a line')
    return pairs


def _conversation(messages: list[Any], path: Path, line: int) -> Pair:
    """The messages up to the last assistant turn are the prompt; that turn is the reference answer."""
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in messages):
        raise InputError(f"{path} line {line}: every message needs a 'role' and a text 'content'", "as in the OpenAI chat format")
    answer = None
    if messages[-1]["role"] == "assistant" and len(messages) > 1:
        answer, messages = messages[-1]["content"], messages[:-1]
    user = [m["content"] for m in messages if m["role"] == "user"]
    return Pair(user[-1] if user else messages[-1]["content"], messages, answer)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"dataset file {path} does not exist", "check --dataset-path") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise InputError(f"{path} is not a UTF-8 JSON file", "give a ShareGPT-format JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})", "give a ShareGPT-format JSON file") from None


def conversation_samples(pairs: list[Pair], opts: DatasetOptions, n: int, tok: TokenCounter | None, chat: bool, strict_lengths: bool) -> list[Sample]:
    """Shuffle, measure and filter the pairs, then take n of them (repeating at random if there are fewer)."""
    pairs = list(pairs)
    if opts.shuffle:
        random.Random(opts.seed).shuffle(pairs)
    samples: list[Sample] = []
    for pair in pairs:
        if len(samples) == n:
            break
        prompt_len = tok.count(pair.text, special=True) if tok else None  # as vLLM: tokenizer(text).input_ids, both
        if opts.output_len is not None:
            output_len = opts.output_len
        elif pair.answer is not None and tok is not None:
            output_len = tok.count(pair.answer, special=True)
        elif pair.answer is None:
            output_len = 256  # vLLM's default for its custom JSONL dataset
        else:
            raise MlcUsageError(
                f"--dataset {opts.name} asks for as many tokens as each reference answer has, which needs the model's tokenizer",
                "give --tokenizer PATH, or a fixed --output-len",
            )
        if strict_lengths and prompt_len is not None:  # vLLM's is_valid_sequence
            if prompt_len < 4 or (opts.output_len is None and output_len < 4) or prompt_len > 1024 or prompt_len + output_len > 2048:
                continue
        samples.append(Sample(pair.messages if chat else pair.text, prompt_len, output_len))
    if not samples:
        raise InputError(f"no usable prompt in the {opts.name} dataset", "prompts of 4-1024 tokens with answers of 4 tokens or more are used")
    if len(samples) < n:
        rng = random.Random(opts.seed)
        samples += [rng.choice(samples) for _ in range(n - len(samples))]
    return samples
