"""Paths to the bundled default data: an original prose corpus, held-out eval text, chat sets, tiny model files.

Importing this module is cheap (no torch, no tokenizers). See README.md in this folder.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).parent
CORPUS_DIR = DATA_DIR / "corpus"


def corpus_path() -> Path:
    """Gives back the plain-text training corpus (articles separated by two blank lines)."""
    return CORPUS_DIR / "train.txt"


def eval_text_path() -> Path:
    """Gives back the held-out text for perplexity reports; none of it appears in the training corpus."""
    return CORPUS_DIR / "eval.txt"


def chat_train_path() -> Path:
    """Gives back the chat SFT training set: JSONL, one {"messages": [...]} conversation a line."""
    return CORPUS_DIR / "chat_train.jsonl"


def chat_eval_path() -> Path:
    """Gives back the held-out chat set, same format as chat_train_path()."""
    return CORPUS_DIR / "chat_eval.jsonl"


def preference_train_path() -> Path:
    """Gives back the DPO preference pairs built from the chat training set (build_preferences.py)."""
    return CORPUS_DIR / "preference_train.jsonl"


def preference_eval_path() -> Path:
    """Gives back the held-out preference pairs, built from the held-out chat set."""
    return CORPUS_DIR / "preference_eval.jsonl"


def tiny_model_dir() -> Path:
    """Gives back the Hugging Face directory of the demo model: tokenizer and config, no weights."""
    return DATA_DIR / "tiny"
