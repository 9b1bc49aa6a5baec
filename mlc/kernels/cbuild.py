"""Build a small C library once, with the system C compiler, into the mlc cache: shared by mlc's ctypes kernels.

The file name is keyed by the sources, the flags, the compiler's version and whatever else the caller adds (the CPU,
for -march=native), so a cache shared between machines or versions never loads a stale or foreign build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cached_library(compiler: str, name: str, sources: Sequence[Path], flags: Sequence[str], libs: Sequence[str] = (),
                   key_extra: Sequence[str] = ()) -> Path:
    """The path of the built library, building it first if the cache has none (OSError or RuntimeError if it cannot)."""
    from mlc.paths import cache_dir

    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [*(s.read_text() for s in sources), " ".join([*flags, *libs]), version, *key_extra]
    target = cache_dir() / "kernels" / f"{name}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([compiler, *flags, "-o", str(out), *map(str, sources), *libs], capture_output=True, text=True)
            if proc.returncode != 0:
                last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
                raise RuntimeError(f"{compiler} failed: {last}")
            os.replace(out, target)  # atomic: a concurrent process sees no library or the whole one
    return target
