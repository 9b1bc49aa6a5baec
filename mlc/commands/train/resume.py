"""Which run a training process writes: a new one, or the interrupted one it resumes (rank 0 owns it).

Resuming reopens the same run (`Run.reopen`): `mlc runs ls` shows one train run that went running -> interrupted ->
running -> completed, its run.json lists when it resumed, its metrics.jsonl holds a `{"event": "resume"}` line
before the repeated steps (readers keep the last line of each step), and its inputs and artifacts stay in one place.

checkpoint.resume:
  auto      the newest train run with the same config fingerprint, if it was interrupted or failed and holds a
            complete checkpoint; else a new run
  none      always a new run
  run:<id>  or the path of a run directory: that run (it must hold a complete checkpoint)

Workers that the launcher restarts (--max-restarts) always go on with the run their launch began.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

from mlc import options
from mlc.commands.train.config import TrainConfig, fingerprint
from mlc.distributed import dist as mdist
from mlc.distributed import report, snapshot
from mlc.distributed.checkpoint import CheckpointManager
from mlc.distributed.preemption import Preempted
from mlc.errors import InputError, MlcError
from mlc.runs import Run
from mlc.runs.index import query_runs
from mlc.runs.refs import find_run
from mlc.runs.rundir import exit_status

CHECKPOINTS = "checkpoints"


def find_resumable(runs_root: Path, print_: str) -> Path | None:
    """The newest train run with this fingerprint, if it can be resumed (interrupted or failed, with a checkpoint)."""
    for data in query_runs(runs_root, command="train"):
        if data.get("summary", {}).get("fingerprint") != print_:
            continue
        path = Path(data["path"])
        if data["status"] in ("interrupted", "failed") and _resumable(path):
            return path
        return None  # the newest one finished (or is running): start afresh
    return None


def run_of_launch(runs_root: Path, launch: str) -> Path | None:
    """The run that this launch started, if it holds a checkpoint (the launcher restarted its workers)."""
    for data in query_runs(runs_root, command="train"):
        if data.get("summary", {}).get("launch_id") == launch:
            path = Path(data["path"])
            return path if _resumable(path) else None
    return None


def _resumable(path: Path) -> bool:
    """A complete disk checkpoint, or in-memory snapshots (a keeper may still hold a newer state than any disk one)."""
    return CheckpointManager(path / CHECKPOINTS).latest() is not None or snapshot.used_by(path)


def choose_run(config: TrainConfig) -> Path | None:
    """The run directory to resume, or None for a new run."""
    resume = config.checkpoint.resume
    root = options.get().runs_dir
    if report.restart_count() > 0 and report.launch_id():  # --max-restarts: go on with the run this launch began
        return run_of_launch(root, report.launch_id())
    if resume == "none":
        return None
    if resume == "auto":
        return find_resumable(root, fingerprint(config))
    path = find_run(root, resume[4:]) if resume.startswith("run:") else Path(resume)
    if not (path / "run.json").is_file():
        raise InputError(f"checkpoint.resume: {resume} is not a run", "give auto, none, run:<id> or a run directory")
    if CheckpointManager(path / CHECKPOINTS).latest() is None:
        raise InputError(f"checkpoint.resume: run {path.name} has no complete checkpoint", "start afresh with checkpoint.resume = \"none\"")
    return path


def _open(config: TrainConfig, given_text: str) -> Run:
    target = choose_run(config)
    if target is not None:
        run = Run.reopen(target)
        run.log(f"resumed by pid {run.data['pid']}")
        return run
    # Under mlc's launcher, the command line the user typed (workers run another one).
    run = Run.create(options.get().runs_dir, "train", report.user_argv() or ["mlc", *sys.argv[1:]], config.to_dict())
    run.set_config(config.to_dict(), given_text, ".toml")
    run.set_summary(fingerprint=fingerprint(config), launch_id=report.launch_id())
    return run


@contextlib.contextmanager
def training_run(config: TrainConfig, given_text: str, info: mdist.DistInfo) -> Iterator[tuple[Run | None, Path]]:
    """Rank 0's Run (None elsewhere) and the run directory every rank uses; the run ends with the block's outcome.

    A preemption (Preempted, after its checkpoint) leaves the run interrupted, so that the same command resumes it.
    """
    run, error = None, None
    if info.is_main:
        try:
            run = _open(config, given_text)
        except MlcError as e:
            error = e
    path, message = mdist.broadcast_object((str(run.path) if run else None, error.one_line() if error else None))
    if message:
        raise error if error is not None else MlcError(message)
    try:
        yield run, Path(path)
    except Preempted as e:
        if run is not None:
            run.log(f"ended interrupted: {e}")
            run.finish("interrupted", 0, str(e))
        raise
    except BaseException as e:
        if run is not None:
            status, code, text = exit_status(e)
            run.log(f"ended {status}: {text}")
            run.finish(status, code, text)
        raise
    else:
        if run is not None:
            run.finish("completed", 0)
