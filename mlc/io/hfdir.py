"""Hugging Face model directories: config.json, generation config and tokenizer files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from mlc.errors import InputError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SIDE_FILES = ("generation_config.json",)


def is_model_dir(path: str | os.PathLike) -> bool:
    """True if path is an HF directory with config.json and safetensors weights (no error: callers try other readers)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (
        any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()
    )


def require_model_dir(path: str | os.PathLike) -> Path:
    """Return path if it is an HF model directory with safetensors weights; else raise a one-line error."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p} does not exist", "check the path, or use a reference such as latest:train")
    if not p.is_dir():
        raise InputError(f"{p} is a file, not a model directory", "pass the directory holding config.json")
    if not (p / "config.json").is_file():
        raise InputError(f"{p} is not a model directory: it has no config.json", "pass a Hugging Face model directory")
    if not any(p.glob("*.safetensors")):
        if any(p.glob("*.bin")) or any(p.glob("*.pt")):
            raise InputError(f"{p} holds PyTorch pickles, not safetensors", "convert it with `mlc checkpoint convert`")
        raise InputError(f"{p} has a config.json but no .safetensors weights", "the download or export is incomplete")
    return p


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    cfg = p / "config.json" if p.is_dir() else p
    if not cfg.is_file():
        raise InputError(f"{p} has no config.json", "pass a Hugging Face model directory")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg} is not valid JSON (line {e.lineno})", "fix or re-download the file") from None
    if not isinstance(data, dict):
        raise InputError(f"{cfg} is not a JSON object", "fix or re-download the file")
    return data


def write_config(path: str | os.PathLike, config: dict[str, Any]) -> None:
    Path(path, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike, include_side_files: bool = True) -> list[str]:
    """Copy the tokenizer (and generation config) files that exist in src; return their names."""
    names = TOKENIZER_FILES + (SIDE_FILES if include_side_files else ())
    copied = []
    for name in names:
        f = Path(src, name)
        if f.is_file():
            shutil.copyfile(f, Path(dst, name))
            copied.append(name)
    return copied
