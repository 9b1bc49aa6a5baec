"""Outputs that appear complete or not at all: temp name first, os.replace into place last."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from mlc.errors import InputError

TMP_MARK = ".mlc-tmp-"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text to path so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + TMP_MARK, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def staging_dir_for(final: Path) -> Path:
    return final.parent / f".{final.name}{TMP_MARK}{os.getpid()}"


@contextlib.contextmanager
def atomic_output_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that is renamed to `final` only if the block finishes.

    A crash, an exception or Ctrl-C removes the staging directory (a kill -9 leaves it under a hidden
    temp name that no tool mistakes for a finished output), so `final` is either absent, the previous
    complete output, or the new complete output.
    """
    final = Path(final).absolute()
    if final.exists() and not overwrite:
        raise InputError(f"output {final} already exists", "choose another --out or pass --overwrite")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir_for(final)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, final)


def replace_dir(staging: Path, final: Path) -> None:
    """Move a finished staging directory to `final`, replacing what was there with two renames."""
    if final.exists():
        old = final.parent / f".{final.name}{TMP_MARK}old-{os.getpid()}"
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
