"""Fault injection for tests of crash safety: `MLC_FAULT_KILL=<point>:<step>` SIGKILLs this process there.

Points: `after-step` (once step N's update and metrics are done) and `in-save` (after the tensors of checkpoint N are
written, before its completion marker). Unset in normal use; nothing else reads it.
"""

from __future__ import annotations

import os
import signal

ENV = "MLC_FAULT_KILL"


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get(ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
