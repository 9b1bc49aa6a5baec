"""Where mlc keeps caches (MLC_CACHE, default ~/.cache/mlc)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    path = Path(os.environ.get("MLC_CACHE") or Path.home() / ".cache" / "mlc")
    path.mkdir(parents=True, exist_ok=True)
    return path
