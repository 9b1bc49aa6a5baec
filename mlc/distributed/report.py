"""What workers tell the launcher that started them: their errors, a preemption, and the user's command line.

mlc's launcher (mlc.distributed.launch) sets MLC_LAUNCH_DIR; a worker that fails writes one JSON file there instead
of printing (N ranks would print N copies), and the launcher prints the root cause once. Outside mlc's launcher
(a plain torchrun or srun) nothing is set and workers print their errors as usual.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

DIR_ENV = "MLC_LAUNCH_DIR"
ARGV_ENV = "MLC_USER_ARGV"  # the command line the user typed (workers run another one)
LAUNCH_ENV = "MLC_LAUNCH_ID"  # one launch, kept across the agent's restarts of its workers


def active() -> bool:
    return bool(os.environ.get(DIR_ENV))


def user_argv() -> list[str] | None:
    raw = os.environ.get(ARGV_ENV)
    return json.loads(raw) if raw else None


def launch_id() -> str | None:
    return os.environ.get(LAUNCH_ENV) or None


def restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _write(kind: str, record: dict[str, Any]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    path = Path(os.environ[DIR_ENV]) / f"{kind}-rank{rank}-try{restart_count()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rank": rank, "restart": restart_count(), "time": time.time(), **record}))
    os.replace(tmp, path)


def write_error(exc: BaseException) -> int:
    """Record this worker's error for the launcher; returns the exit code to leave with."""
    from mlc.errors import MlcError

    if isinstance(exc, MlcError):
        record = {"kind": "mlc", "message": exc.one_line(), "exit_code": exc.exit_code}
    elif isinstance(exc, KeyboardInterrupt):
        record = {"kind": "interrupted", "message": "interrupted", "exit_code": 130}
    else:
        first = (str(exc).splitlines() or [""])[0]
        message = f"{type(exc).__name__}: {first} (an unexpected error: rerun with --debug for the traceback)"
        record = {"kind": "unexpected", "message": message, "exit_code": 1}
    _write("error", record)
    return record["exit_code"]


def write_preempted(message: str) -> None:
    _write("preempted", {"message": message})


def _records(launch_dir: Path, kind: str) -> list[dict[str, Any]]:
    out = []
    for path in launch_dir.glob(f"{kind}-rank*-try*.json"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    last_try = max((r["restart"] for r in out), default=0)
    return sorted((r for r in out if r["restart"] == last_try), key=lambda r: (r["time"], r["rank"]))


def preempted(launch_dir: Path) -> str | None:
    found = _records(launch_dir, "preempted")
    return found[0]["message"] if found else None


def root_cause(launch_dir: Path, failures: dict[int, Any]) -> tuple[str, int]:
    """One line and an exit code for a failed worker group: a user error first (rank 0's if it has one), then the
    earliest error any rank reported, then how a worker died (killed by a signal, or an exit code)."""
    errors = _records(launch_dir, "error")
    mlc_errors = [r for r in errors if r["kind"] == "mlc"]
    pick = next((r for r in mlc_errors if r["rank"] == 0), None) or (mlc_errors or errors or [None])[0]
    if pick is not None:
        return pick["message"], int(pick["exit_code"])
    # When one worker dies, the agent stops the others with SIGTERM, and records them all in the same second: a
    # worker killed by SIGTERM is the cause only when no other worker failed some other way.
    def order(item: tuple[int, Any]) -> tuple[bool, float, int]:
        rank, failure = item
        return failure.exitcode == -signal.SIGTERM, failure.timestamp, rank

    for rank, failure in sorted(failures.items(), key=order):
        if failure.exitcode < 0:
            name = signal.Signals(-failure.exitcode).name
            return f"worker rank {rank} (pid {failure.pid}) was killed by {name}", 128 - failure.exitcode
        return f"worker rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}", failure.exitcode or 1
    return "the workers failed without reporting why", 1
