"""--expert-prompts: positive and negative prompts per expert (mergekit-moe style), read and checked.

The file is YAML or JSON:

    experts:
      - positive: ["def fib(n):", "Write a Python function"]
        negative: ["Once upon a time"]
      - positive: ["The capital of France is"]

one entry per expert, in expert order. mergekit's key names (positive_prompts, negative_prompts) work too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ExpertPrompts:
    positive: list[str]
    negative: list[str] = field(default_factory=list)


def read_expert_prompts(path: str | Path, experts: int) -> tuple[list[ExpertPrompts], list[str]]:
    """(prompts per expert, problems); every problem in the file is listed, not just the first."""
    import yaml

    p = Path(path)
    if not p.is_file():
        return [], [f"--expert-prompts {p} does not exist"]
    try:
        data = yaml.safe_load(p.read_text())  # YAML is a superset of JSON
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        return [], [f"--expert-prompts {p} is not valid YAML or JSON{line}"]
    entries = data.get("experts") if isinstance(data, dict) else data
    if not isinstance(entries, list):
        return [], [f"--expert-prompts {p} needs a list `experts:` with one entry per expert"]
    problems = []
    if len(entries) != experts:
        problems.append(f"--expert-prompts {p} has prompts for {len(entries)} experts, but --experts is {experts}")
    result = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(f"--expert-prompts expert {i}: expected a mapping with `positive` (and optional `negative`) prompts")
            continue
        positive = _strings(entry.get("positive", entry.get("positive_prompts")))
        negative = _strings(entry.get("negative", entry.get("negative_prompts")))
        if positive is None or not positive:
            problems.append(f"--expert-prompts expert {i} has no positive prompts (a non-empty list of strings)")
            continue
        if negative is None:
            problems.append(f"--expert-prompts expert {i}: `negative` must be a list of strings")
            continue
        result.append(ExpertPrompts(positive, negative))
    return result, problems


def _strings(value: object) -> list[str] | None:
    """The prompts as a list of non-empty strings; a lone string counts as one; None when malformed."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        return None
    return list(value)
