"""The shard spec language (UCP's pattern language, declarative): how tensor-parallel shards combine into whole
parameters under Hugging Face names, and how whole parameters cut back into shards. The keys are documented
in specs/megatron-llama.toml; `load_spec` reads a shipped spec by name or any TOML file.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError

SPECS_DIR = Path(__file__).parent / "specs"
KINDS = ("replicated", "average", "column", "row", "vocab", "fused")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def width(expr: str | int, config: dict[str, Any]) -> int:
    """An integer expression over config.json keys: numbers, names, + - * //."""
    if isinstance(expr, int):
        return expr

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "head_dim" and config.get("head_dim") is None:
                return int(config["hidden_size"]) // int(config["num_attention_heads"])
            if config.get(node.id) is None:
                raise InputError(f"shard spec width {expr!r}: config.json has no {node.id!r}", "pass --config with the model's config.json")
            return int(config[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise InputError(f"shard spec width {expr!r} is not an expression of numbers, config keys, + - * //", "fix the spec")

    return ev(ast.parse(str(expr), mode="eval").body)


@dataclass
class Rule:
    match: str
    shard: str
    to: list[str]
    parts: list[str] = field(default_factory=list)
    groups: str | None = None
    expert: str | None = None
    regex: re.Pattern[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.shard not in KINDS:
            raise InputError(f"shard spec rule {self.match!r}: shard {self.shard!r} is not one of {', '.join(KINDS)}", "fix the spec")
        if len(self.to) > 1 and len(self.parts) != len(self.to):
            raise InputError(f"shard spec rule {self.match!r}: {len(self.to)} names in `to` need as many `parts`", "fix the spec")
        if self.shard == "fused" and not self.parts:
            raise InputError(f"shard spec rule {self.match!r}: fused needs `parts`", "fix the spec")
        pattern = re.escape(self.match)
        for name in re.findall(r"\\\{(\w+)\\\}", pattern):
            pattern = pattern.replace(f"\\{{{name}\\}}", f"(?P<{name}>\\d+)")
        self.regex = re.compile(pattern + "$")

    def widths(self, config: dict[str, Any]) -> list[int]:
        return [width(p, config) for p in self.parts]

    def group_count(self, config: dict[str, Any]) -> int:
        return width(self.groups, config) if self.groups else 1


@dataclass
class Spec:
    name: str
    description: str
    files: str
    rules: list[Rule]
    files_ep: str | None = None
    vocab_multiple: int = 1

    def rule_for(self, name: str) -> tuple[Rule, dict[str, str]]:
        for rule in self.rules:
            m = rule.regex.match(name)
            if m:
                return rule, m.groupdict()
        raise InputError(f"parameter {name!r} matches no rule of shard spec {self.name!r}", "add a [[param]] rule for it to the spec")

    def source_name(self, hf: str) -> tuple[Rule, str, int, dict[str, str]]:
        """(rule, source name, part index, captures) of an HF name: the inverse mapping, for writing shards."""
        for rule in self.rules:
            for i, template in enumerate(rule.to):
                pattern = re.escape(template)
                for name in re.findall(r"\\\{(\w+)\\\}", pattern):
                    pattern = pattern.replace(f"\\{{{name}\\}}", f"(?P<{name}>\\d+)")
                m = re.match(pattern + "$", hf)
                if m:
                    return rule, rule.match.format(**m.groupdict()), i, m.groupdict()
        raise InputError(f"tensor {hf!r} has no place in shard spec {self.name!r}", "add a [[param]] rule for it to the spec")


def load_spec(name: str) -> Spec:
    import tomllib

    path = Path(name)
    if not path.is_file():
        path = SPECS_DIR / f"{name}.toml"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in SPECS_DIR.glob("*.toml")))
        raise InputError(f"no shard spec {name!r}", f"shipped specs: {shipped}; or give a TOML file")
    try:
        data = tomllib.loads(path.read_text())
        rules = [Rule(r["match"], r["shard"], [r["to"]] if isinstance(r["to"], str) else list(r["to"]), list(r.get("parts", [])), r.get("groups"), r.get("expert")) for r in data["param"]]
        return Spec(path.stem, data.get("description", ""), data["files"], rules, data.get("files_ep"), int(data.get("vocab_multiple", 1)))
    except (tomllib.TOMLDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path} is not a shard spec ({e.__class__.__name__}: {e})", "see specs/megatron-llama.toml for the keys") from None


# ---- combining shards into whole tensors, and cutting them back ------------------------------------------------

def combine(rule: Rule, shards: list[torch.Tensor], config: dict[str, Any], name: str) -> torch.Tensor:
    """The whole source tensor from its tensor-parallel shards (rank order)."""
    tp = len(shards)
    if rule.shard == "replicated" or shards[0].ndim == 0:
        for r, s in enumerate(shards[1:], 1):
            if not torch.equal(s, shards[0]):
                raise InputError(f"{name}: replicated parameter differs between TP ranks 0 and {r}", "the shards are not from one checkpoint, or the spec marks it wrongly")
        return shards[0]
    if rule.shard == "average":
        return torch.stack([s.float() for s in shards]).mean(0).to(shards[0].dtype)
    if rule.shard == "row":
        return torch.cat(shards, dim=1)
    if rule.shard == "fused":
        widths = [w // tp for w in rule.widths(config)]
        pieces = [s.split(widths, dim=0) for s in shards]
        return torch.cat([torch.cat([p[i] for p in pieces], dim=0) for i in range(len(widths))], dim=0)
    whole = torch.cat(shards, dim=0)
    if rule.shard == "vocab":
        whole = whole[: int(config["vocab_size"])]
    return whole


def cut(rule: Rule, whole: torch.Tensor, tp: int, vocab_multiple: int, name: str) -> list[torch.Tensor]:
    """The tensor-parallel shards of a whole source tensor (inverse of combine)."""
    if rule.shard in ("replicated", "average") or whole.ndim == 0:
        return [whole] * tp
    if rule.shard == "row":
        return _even(whole, tp, 1, name)
    if rule.shard == "fused":
        raise AssertionError("fused tensors are cut per part (cut_fused)")
    if rule.shard == "vocab":
        multiple = vocab_multiple * tp
        padded = -(-whole.shape[0] // multiple) * multiple
        whole = torch.cat([whole, whole.new_zeros(padded - whole.shape[0], *whole.shape[1:])])
    return _even(whole, tp, 0, name)


def cut_fused(parts: list[torch.Tensor], tp: int, name: str) -> list[torch.Tensor]:
    chunks = [_even(p, tp, 0, name) for p in parts]
    return [torch.cat([c[r] for c in chunks], dim=0) for r in range(tp)]


def _even(t: torch.Tensor, tp: int, dim: int, name: str) -> list[torch.Tensor]:
    if t.shape[dim] % tp:
        raise InputError(f"{name}: dimension {dim} of size {t.shape[dim]} does not split over {tp} tensor-parallel ranks", "choose a --tp that divides it")
    return [c.contiguous() for c in t.chunk(tp, dim=dim)]


def split_parts(rule: Rule, whole: torch.Tensor, config: dict[str, Any]) -> list[torch.Tensor]:
    """The HF tensors inside one whole source tensor (one unless it stacks parts)."""
    if len(rule.to) == 1:
        return [whole]
    widths, groups = rule.widths(config), rule.group_count(config)
    grouped = whole.reshape(groups, sum(widths), *whole.shape[1:])
    return [p.reshape(groups * w, *whole.shape[1:]).contiguous() for p, w in zip(grouped.split(widths, dim=1), widths)]


def join_parts(rule: Rule, parts: list[torch.Tensor], config: dict[str, Any]) -> torch.Tensor:
    """Inverse of split_parts: stack HF tensors into the source's fused layout."""
    if len(parts) == 1:
        return parts[0]
    groups = rule.group_count(config)
    grouped = [p.reshape(groups, p.shape[0] // groups, *p.shape[1:]) for p in parts]
    joined = torch.cat(grouped, dim=1)
    return joined.reshape(-1, *parts[0].shape[1:])
