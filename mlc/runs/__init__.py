"""Run directories, artifacts, lineage and the SQLite index (torch-free)."""

from mlc.runs.record import RunRecord, read_run
from mlc.runs.rundir import Run, open_run

__all__ = ["Run", "RunRecord", "open_run", "read_run"]
