"""Checkpoint formats installed as `mlc.formats.v1` plugins: find one by name or by what a path holds.

What a format implements (CheckpointFormat, the Checkpoint it opens, TensorEntry, ConvertOptions) is
the public contract in mlc.contracts.formats, re-exported here for the readers and writers in mlc.io.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlc.contracts.formats import OPTIM_SEP, Checkpoint, CheckpointFormat, ConvertOptions, TensorEntry, can_write
from mlc.errors import InputError, MlcError

HF = "hf"
__all__ = [
    "HF", "OPTIM_SEP", "Checkpoint", "CheckpointFormat", "ConvertOptions", "TensorEntry", "can_write",
    "installed_formats", "get_format", "detect_format", "describe_path",
]


def installed_formats() -> dict[str, CheckpointFormat]:
    """Every loadable format plugin by name (a broken plugin is reported by `mlc plugins` and skipped)."""
    from mlc import plugins

    return plugins.load_all("formats")


def get_format(name: str) -> CheckpointFormat:
    from mlc import plugins

    return plugins.load_one("formats", name)


def detect_format(src: str | os.PathLike) -> CheckpointFormat:
    """The installed format that recognises src, or a one-line error saying what src looks like."""
    path = Path(src)
    if not path.exists():
        raise InputError(f"{path} does not exist", "check the path")
    formats = installed_formats()
    found = [f for f in formats.values() if f.detect(path)]
    if len(found) == 1:
        return found[0]
    names = ", ".join(sorted(formats)) or "none installed"
    if not found:
        raise InputError(f"no installed checkpoint format recognises {path} ({describe_path(path)})", f"installed formats: {names}; say which with --from")
    raise MlcError(f"{path} matches several formats ({', '.join(f.name for f in found)})", "choose one with --from")


def describe_path(path: Path) -> str:
    """A few words on what a path holds, for error messages."""
    if path.is_file():
        with open(path, "rb") as f:
            head = f.read(8)
        return f"a file of {path.stat().st_size} bytes starting {head[:4]!r}"
    names = sorted(p.name for p in path.iterdir())[:6]
    return "an empty directory" if not names else f"a directory holding {', '.join(names)}{' ...' if len(names) == 6 else ''}"
