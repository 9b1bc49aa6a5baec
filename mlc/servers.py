"""Waiting for a server started as a child process to answer GET /health: demo, tests and benchmarks share it."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlc.errors import MlcError


def wait_healthy(url: str, proc: subprocess.Popen | None = None, timeout: float = 180, log: Path | None = None,
                 what: str = "the server") -> float:
    """Seconds until GET url answers 200; MlcError if proc exits first or timeout passes (naming the log)."""
    hint = f"its output is in {log}" if log else None
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc is not None and proc.poll() is not None:
            raise MlcError(f"{what} exited with code {proc.returncode} before it was ready", hint)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or still loading
        time.sleep(0.2)
    raise MlcError(f"{what} was not ready after {timeout:.0f}s", hint)
