"""PEFT LoRA adapter directories (adapter_config.json + adapter_model.safetensors), read once for both users.

`mlc merge lora` folds an adapter into its base; `mlc serve --lora` applies it unfolded. Both need the same
reading: which base tensor each saved matrix belongs to (Linear lora_A/lora_B, embedding lora_embedding_A/B,
lora_B biases, modules_to_save replacements; names saved with or without the adapter name `.default`),
and PEFT's scale per module: lora_alpha / r, or lora_alpha / sqrt(r) with rslora, with rank_pattern and
alpha_pattern matched as PEFT matches them. Tensors are read lazily (the file is memory-mapped).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc.errors import InputError
from mlc.io.safetensors_reader import ModelTensors

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HINT = "give the directory `mlc train` or peft saved"


@dataclass
class PeftAdapter:
    """One adapter: its config and, per base tensor name (`...q_proj.weight`), the saved tensors that change it."""

    path: Path
    config: dict[str, Any]
    tensors: ModelTensors
    linear: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight -> (lora_A key, lora_B key)
    embedding: dict[str, tuple[str, str]] = field(default_factory=dict)  # base weight -> (lora_embedding_A, _B keys)
    biases: dict[str, str] = field(default_factory=dict)  # base bias -> lora_B bias key
    replaced: dict[str, str] = field(default_factory=dict)  # base tensor -> modules_to_save tensor key

    def problems(self) -> list[str]:
        """What makes this something other than a plain LoRA (another PEFT type, DoRA)."""
        out = []
        if self.config.get("peft_type", "LORA") != "LORA":
            out.append(f"{self.path}: peft_type {self.config.get('peft_type')} is not LORA")
        if self.config.get("use_dora"):
            out.append(f"{self.path}: DoRA adapters are not supported (their magnitude vectors need the full weight norm)")
        return out

    def targets(self) -> set[str]:
        return set(self.linear) | set(self.embedding) | set(self.biases) | set(self.replaced)

    def scale(self, module: str) -> float:
        """PEFT's scale of a module's B @ A (module: the name without .weight)."""
        r = _pattern(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", r))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def linear_pair(self, name: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(A of shape (r, in), B of shape (out, r)) of a Linear target, unscaled, in the weight's orientation."""
        a, b = (self.tensors.read(k, dtype) for k in self.linear[name])
        return (b.T, a.T) if self.config.get("fan_in_fan_out") else (a, b)

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The additive delta for base tensor `name` (None when the adapter does not add to it)."""
        module = name.rsplit(".", 1)[0]
        if name in self.linear:
            a, b = self.linear_pair(name, dtype)
            return (b @ a) * self.scale(module)
        if name in self.embedding:
            a, b = (self.tensors.read(k, dtype) for k in self.embedding[name])
            return (b @ a).T * self.scale(module)
        if name in self.biases:
            return self.tensors.read(self.biases[name], dtype)
        return None

    def shape_of_delta(self, name: str) -> tuple[int, ...]:
        """The shape of the base tensor this adapter's saved tensors fit."""
        if name in self.linear:
            a, b = (self.tensors.info(k).shape for k in self.linear[name])
            return (a[1], b[0]) if self.config.get("fan_in_fan_out") else (b[0], a[1])
        if name in self.embedding:
            a, b = (self.tensors.info(k).shape for k in self.embedding[name])
            return (a[1], b[0])
        return tuple(self.tensors.info(self.biases.get(name) or self.replaced[name]).shape)


def read_adapter(path: Path) -> PeftAdapter:
    """The adapter at path, its saved tensors sorted by the base tensor they change; InputError if it is not one."""
    path = Path(path)
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise InputError(f"{path} is not a PEFT adapter (no {CONFIG_FILE})", HINT)
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{config_file} is not JSON ({e})", HINT) from None
    if not isinstance(config, dict):
        raise InputError(f"{config_file} is not a JSON object", HINT)
    if not (path / ADAPTER_WEIGHTS).is_file():
        bin_only = (path / "adapter_model.bin").is_file()
        raise InputError(f"{path} has no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin)" if bin_only else ""),
                         "save the adapter as safetensors (peft's default)")
    adapter = PeftAdapter(path, config, ModelTensors(path / ADAPTER_WEIGHTS))
    keys = set(adapter.tensors.names())
    for key in sorted(keys):
        rest = re.sub(r"\.(lora_[AB]|lora_embedding_[AB])\.default", r".\1", key.removeprefix(PREFIX))
        if m := re.fullmatch(r"(.+)\.lora_A(\.weight)?", rest):
            adapter.linear[m.group(1) + ".weight"] = (key, _partner(key, "lora_A", "lora_B", keys, path))
        elif m := re.fullmatch(r"(.+)\.lora_embedding_A(\.weight)?", rest):
            adapter.embedding[m.group(1) + ".weight"] = (key, _partner(key, "lora_embedding_A", "lora_embedding_B", keys, path))
        elif m := re.fullmatch(r"(.+)\.lora_B\.bias", rest):
            adapter.biases[m.group(1) + ".bias"] = key
        elif m := re.fullmatch(r"(.+)\.(lora_B|lora_embedding_B)(\.weight)?", rest):
            _partner(key, m.group(2), m.group(2).replace("B", "A"), keys, path)
        else:  # modules_to_save, or a base layer PEFT saved whole (embeddings it may have resized)
            adapter.replaced[re.sub(r"\.(modules_to_save\.default|base_layer)", "", rest)] = key
    return adapter


def _partner(key: str, this: str, other: str, keys: set[str], path: Path) -> str:
    """The key of the other matrix of a LoRA pair; InputError when the adapter holds only one of them."""
    partner = key.replace(this, other)
    if partner not in keys:
        raise InputError(f"{path}: {key} has no {other} beside it", "the adapter is incomplete: save it again")
    return partner


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: a pattern applies when the module name ends with it (as a regex, at a dot boundary)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
