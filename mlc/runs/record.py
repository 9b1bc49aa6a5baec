"""Reading a run directory's record (run.json) with its live status: the bottom of mlc.runs.

index, refs and rundir all read runs through here, so none of them needs another to do it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlc.errors import InputError


def lock_is_held(path: Path) -> bool:
    """True when some live process holds the run's lock (the run is really running)."""
    try:
        fd = os.open(path / "run.lock", os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@dataclass
class RunRecord:
    """A run as read from disk, with the live status (a dead 'running' run reads as 'interrupted')."""

    path: Path
    data: dict[str, Any]

    @property
    def id(self) -> str:
        return self.data["id"]

    @property
    def status(self) -> str:
        return self.data["status"]

    @property
    def command(self) -> str:
        return self.data["command"]


def read_run(path: str | os.PathLike) -> RunRecord:
    path = Path(path)
    try:
        data = json.loads((path / "run.json").read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is not a run directory (no run.json)", "list runs with `mlc runs ls`") from None
    except json.JSONDecodeError:
        raise InputError(f"{path}/run.json is not valid JSON", "the run record is damaged; `mlc runs gc` can remove it") from None
    if data.get("status") == "running" and data.get("host") == socket.gethostname() and not lock_is_held(path):
        data["status"] = "interrupted"
        data.setdefault("error", "the process died without finishing (killed or crashed)")
    return RunRecord(path, data)
