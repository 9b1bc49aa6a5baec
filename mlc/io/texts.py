"""Documents from a text file (one document) or JSONL (a "text" field, or chat "messages", per line)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlc.errors import InputError


def read_texts(path: str | os.PathLike, option: str = "--data", chat: bool = False) -> list[str]:
    """The documents in path; `chat` also takes {"messages": [...]} lines (their contents, one per line).

    option names the flag that gave the file, for the errors' hints.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist or is not a file", f"pass a .txt or .jsonl file with {option}")
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
        elif chat and isinstance(record, dict) and isinstance(record.get("messages"), list):
            texts.append("\n".join(str(m.get("content", "")) for m in record["messages"] if isinstance(m, dict)))
        else:
            wanted = "neither a 'text' string nor a 'messages' list" if chat else "no string field 'text'"
            raise InputError(f"{path}:{n} has {wanted}", 'write lines like {"text": "..."}')
    if not texts:
        raise InputError(f"{path} holds no records", "give at least one line with a text field")
    return texts
