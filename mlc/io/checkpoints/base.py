"""What every built-in format shares: an opened checkpoint as a list of tensors plus a reader, and HF side files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mlc.errors import InputError
from mlc.io.formats import ConvertOptions, TensorEntry
from mlc.io.hfdir import TOKENIZER_FILES, read_config


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclass
class Opened:
    """A Checkpoint (see mlc.io.formats): entries listed up front, each read by `reader(name)`."""

    format: str
    path: Path
    entries: list[TensorEntry]
    reader: Callable[[str], torch.Tensor]
    config: dict[str, Any] | None = None
    assets: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    closer: Callable[[], None] | None = None

    def tensors(self) -> list[TensorEntry]:
        return self.entries

    def read(self, name: str) -> torch.Tensor:
        return self.reader(name)

    def close(self) -> None:
        if self.closer is not None:
            self.closer()

    def __enter__(self) -> "Opened":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def output_dtype(entry: TensorEntry, options: ConvertOptions) -> torch.dtype:
    """The dtype a weight is written in: --dtype for floating weights, else as stored (optimizer state stays)."""
    stored = torch_dtype(entry.dtype)
    if options.dtype and stored.is_floating_point and not entry.is_optimizer:
        from mlc.dtypes import parse_dtype

        return parse_dtype(options.dtype)
    return stored


def weights(ckpt: Any, options: ConvertOptions) -> list[TensorEntry]:
    """The entries a writer should write: weights, plus optimizer state when asked for."""
    return [e for e in ckpt.tensors() if options.with_optimizer or not e.is_optimizer]


def given_config(options: ConvertOptions) -> tuple[dict[str, Any] | None, Path | None]:
    """(config.json, its directory) from --config, for sources that carry no config of their own."""
    if not options.config:
        return None, None
    path = Path(options.config)
    if not path.exists():
        raise InputError(f"--config {path} does not exist", "give a config.json or the model directory holding it")
    return read_config(path), (path if path.is_dir() else path.parent)


def require_config(ckpt: Any, what: str) -> dict[str, Any]:
    if ckpt.config is None:
        raise InputError(
            f"{ckpt.path} ({ckpt.format}) carries no model config, which {what} needs",
            "pass --config with the model's config.json (or its HF directory)",
        )
    return ckpt.config


def copy_assets(ckpt: Any, out_dir: Path) -> list[str]:
    """Copy tokenizer files and generation_config.json from the checkpoint's asset directory."""
    if ckpt.assets is None:
        return []
    copied = []
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        f = Path(ckpt.assets, name)
        if f.is_file():
            shutil.copyfile(f, out_dir / name)
            copied.append(name)
    return copied


def write_config(out_dir: Path, config: dict[str, Any], dtype: torch.dtype | None) -> None:
    config = dict(config)
    if dtype is not None:
        config["torch_dtype"] = dtype_str(dtype)
        config.pop("dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main_dtype(entries: list[TensorEntry], options: ConvertOptions) -> torch.dtype | None:
    """The dtype most weight bytes are written in (config.json's torch_dtype)."""
    totals: dict[torch.dtype, int] = {}
    for e in entries:
        if not e.is_optimizer:
            d = output_dtype(e, options)
            if d.is_floating_point:
                totals[d] = totals.get(d, 0) + e.numel * d.itemsize
    return max(totals, key=totals.get) if totals else None
