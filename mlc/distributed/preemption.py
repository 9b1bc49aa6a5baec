"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill) asks the training loop to checkpoint and stop.

The handler only sets a flag; the loop sums it over every process at the end of each step (in the all-reduce it
does anyway), so all ranks stop after the same step, write one checkpoint together and exit 0. A second SIGTERM,
or Ctrl-C, interrupts at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator


class Preempted(Exception):
    """The loop stopped for a preemption after writing a checkpoint; the message says where."""


class Preemption:
    def __init__(self) -> None:
        self.requested_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def _handler(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested_at = time.monotonic()

    @contextlib.contextmanager
    def installed(self) -> Iterator["Preemption"]:
        """SIGTERM sets the flag while the block runs (main thread only: signals are delivered there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.signal(signal.SIGTERM, self._handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)

    def seconds(self) -> float:
        """Seconds since the signal arrived."""
        return time.monotonic() - self.requested_at if self.requested_at is not None else 0.0
