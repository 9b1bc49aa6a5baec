"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF vocabulary metadata.

GGUF keeps the vocabulary, the BPE merges, token types and llama.cpp's name for the pre-tokenizer
regex; tokenizer.json needs those regexes spelled out, so the known ones are listed here.
"""

from __future__ import annotations

from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from mlc.errors import InputError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types (1 normal, 2 unknown, 5 unused, 6 byte)

LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


# llama.cpp's tokenizer.ggml.pre names -> the pre-tokenizer of the original HF tokenizer.
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "gpt-2": _byte_level,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
    "llama3": lambda: _split_then_bytes(LLAMA3_REGEX),
    "llama-bpe": lambda: _split_then_bytes(LLAMA3_REGEX),
    "qwen2": lambda: _split_then_bytes(QWEN2_REGEX),
}


def _get(reader: GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build_tokenizer(reader: GGUFReader, path: str) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer.json content, tokenizer_config.json dict) for a GGUF file's byte-level BPE vocabulary."""
    kind = _get(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported",
            "mlc rebuilds byte-level BPE ('gpt2') tokenizers; copy the original tokenizer.json into the output instead",
        )
    pre = _get(reader, "tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"{path}: GGUF pre-tokenizer {pre!r} is not known to mlc", f"known: {', '.join(PRE_TOKENIZERS)}")
    tokens: list[str] = _get(reader, "tokenizer.ggml.tokens")
    types: list[int] = _get(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in _get(reader, "tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def token(key: str) -> str | None:
        i = _get(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_get(reader, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_get(reader, f"{_get(reader, 'general.architecture')}.context_length", 2048)),
    }
    template = _get(reader, "tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, {k: v for k, v in config.items() if v is not None}
