"""Run directories, artifacts, lineage and the SQLite index (torch-free)."""

from mlc.runs.rundir import Run, RunRecord, open_run, read_run

__all__ = ["Run", "RunRecord", "open_run", "read_run"]
