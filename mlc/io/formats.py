"""Checkpoint formats: what a plugin in the `mlc.formats.v1` entry-point group provides.

A format plugin is an object (registered as "module:object") with:

    name: str                 what users type after --from / --to
    description: str          one line for listings
    detect(path) -> bool      cheap: does this file or directory look like my format?
    to_hf(src, out_dir, dtype=None) -> None
                              write a complete Hugging Face model directory (config.json with
                              architectures, safetensors weights, tokenizer, generation config)
                              into out_dir, which exists and is empty; dtype None keeps the
                              source precision (dequantised formats choose float32).

A format that can also be written from an HF directory adds `from_hf(hf_dir, out_path, dtype=None)`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from mlc.errors import InputError, MlcError

HF = "hf"


@runtime_checkable
class CheckpointFormat(Protocol):
    name: str
    description: str

    def detect(self, path: Path) -> bool: ...

    def to_hf(self, src: Path, out_dir: Path, dtype: torch.dtype | None = None) -> None: ...


def installed_formats() -> dict[str, CheckpointFormat]:
    """Every loadable format plugin by name (a broken plugin is reported by `mlc plugins` and skipped)."""
    from mlc import plugins

    return plugins.load_all("formats")


def get_format(name: str) -> CheckpointFormat:
    from mlc import plugins

    return plugins.load_one("formats", name)


def detect_format(src: str | os.PathLike) -> CheckpointFormat:
    """The installed format that recognises src, or a one-line error listing what is installed."""
    path = Path(src)
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path")
    formats = installed_formats()
    found = [f for f in formats.values() if f.detect(path)]
    if len(found) == 1:
        return found[0]
    names = ", ".join(sorted(formats)) or "none installed"
    if not found:
        raise InputError(
            f"no installed checkpoint format recognises {path}",
            f"installed formats: {names}; install a format plugin (e.g. pip install -e plugins/mlc-gguf) or pass --from",
        )
    raise MlcError(f"{path} matches several formats ({', '.join(f.name for f in found)})", "choose one with --from")
