"""Fault injection for tests of crash safety and preemption. Unset in normal use; nothing else reads these.

- `MLC_FAULT_KILL=<point>:<step>[:rank<R>]` SIGKILLs this process there (only rank R's, if given).
- `MLC_FAULT_SIGNAL=<point>:<step>:<SIGNAL>[:launcher]` sends SIGNAL (e.g. TERM) to this process there, or, with
  `:launcher`, from rank 0 to the process that launched the workers (what SLURM or Kubernetes signal).

A fault happens once: workers restarted by the launcher (--max-restarts) run without it.

Points: `after-step` (once step N's update and metrics are done) and `in-save` (after the tensors of checkpoint N are
written, before its completion marker) and `after-snapshot` (once this rank's keeper holds the in-memory snapshot of
step N and its parity; from the snapshot thread).
"""

from __future__ import annotations

import os
import signal

ENV = "MLC_FAULT_KILL"
SIGNAL_ENV = "MLC_FAULT_SIGNAL"


def maybe_kill(point: str, step: int) -> None:
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    wanted = os.environ.get(SIGNAL_ENV, "").split(":")
    if wanted[:2] == [point, str(step)] and len(wanted) >= 3:
        sig = signal.Signals[f"SIG{wanted[2]}"]
        if wanted[3:] == ["launcher"]:
            if os.environ.get("RANK", "0") == "0":
                os.kill(os.getppid(), sig)
        else:
            os.kill(os.getpid(), sig)
    # After the signal: a launcher SIGKILLed by rank 0 and every worker killed make the whole trainer gone at once.
    kill = os.environ.get(ENV, "").split(":")
    if kill[:2] == [point, str(step)] and (len(kill) == 2 or kill[2] == f"rank{os.environ.get('RANK', '0')}"):
        os.kill(os.getpid(), signal.SIGKILL)
