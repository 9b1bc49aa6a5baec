"""Build the bundled preference pairs for DPO from the chat sets: `python -m mlc.data.build_preferences`.

For each conversation, the prompt is every turn before the last assistant reply, "chosen" is that reply and
"rejected" is the last reply of the conversation `SHIFT` lines further on (an answer to another question).
Deterministic: the same chat files give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlc.data import CORPUS_DIR

SHIFT = 7


def build(source: Path, out: Path) -> int:
    conversations = [json.loads(line)["messages"] for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = []
    for i, messages in enumerate(conversations):
        other = conversations[(i + SHIFT) % len(conversations)]
        pair = {"prompt": messages[:-1], "chosen": [messages[-1]], "rejected": [other[-1]]}
        lines.append(json.dumps(pair, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


if __name__ == "__main__":
    for name in ("train", "eval"):
        n = build(CORPUS_DIR / f"chat_{name}.jsonl", CORPUS_DIR / f"preference_{name}.jsonl")
        print(f"{n} pairs -> {CORPUS_DIR / f'preference_{name}.jsonl'}")
