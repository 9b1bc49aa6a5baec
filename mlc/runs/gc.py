"""Garbage collection of runs: failed and interrupted runs, and temp outputs left by killed processes."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from mlc.io.atomic import TMP_MARK
from mlc.runs import index
from mlc.runs.record import lock_is_held, read_run


def collect(runs_root: Path, statuses: set[str], older_than_days: float, dry_run: bool) -> list[str]:
    """Remove matching runs and stale temp dirs; return what was (or would be) removed."""
    statuses.discard("running")  # a live run is never collected
    records = []
    for path in index.run_dirs(runs_root):
        try:
            records.append(read_run(path))
        except Exception:  # noqa: BLE001 - a run.json damaged in any way must not stop gc (ls shows it)
            continue
    needed = {i.get("producer_run") for r in records if r.status not in statuses for i in r.data.get("inputs", [])}
    cutoff = dt.datetime.now().astimezone() - dt.timedelta(days=older_than_days)
    removed = []
    for r in records:
        when = dt.datetime.fromisoformat(r.data.get("ended") or r.data["started"])
        if r.status in statuses and r.id not in needed and when <= cutoff and not lock_is_held(r.path):
            removed.append(str(r.path))
            if not dry_run:
                shutil.rmtree(r.path, ignore_errors=True)
    for path in runs_root.glob(f"*/artifacts/*{TMP_MARK}*"):
        if not lock_is_held(path.parent.parent):
            removed.append(str(path))
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
    if removed and not dry_run:
        index.reindex(runs_root)
    return removed
