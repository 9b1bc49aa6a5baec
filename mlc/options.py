"""The global options (mlc --runs-dir/--json/-v/-q/--debug), readable from any command."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GlobalOptions:
    runs_dir: Path = field(default_factory=lambda: Path(os.environ.get("MLC_RUNS_DIR", "runs")))
    json: bool = False
    verbosity: int = 0  # -1 quiet, 0 normal, 1+ verbose
    debug: bool = bool(os.environ.get("MLC_DEBUG"))


_current = GlobalOptions()


def get() -> GlobalOptions:
    return _current


def set_options(options: GlobalOptions) -> None:
    global _current
    _current = options


def want_json(local_flag: bool = False) -> bool:
    """True when machine output was asked for, by `mlc --json ...` or the command's own --json."""
    return local_flag or _current.json
