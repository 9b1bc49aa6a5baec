"""Helpers for training tests: a small config on the bundled tiny model, and `mlc train` in real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "mlc" / "data"

# 8 steps of 8 sequences of 32 tokens on the 1M-parameter tiny Llama: a few seconds per process.
SMALL = f"""
[model]
config = "{DATA / 'tiny'}"
[data]
train = "{DATA / 'corpus' / 'train.txt'}"
eval = "{DATA / 'corpus' / 'eval.txt'}"
seq_len = 32
[train]
steps = 8
batch_size = 8
micro_batch_size = 4
[optim]
lr = 3e-3
[schedule]
warmup_steps = 2
[eval]
max_sequences = 16
[checkpoint]
interval = 2
keep_last_k = 2
[log]
tensorboard = false
"""


def write_config(tmp_path: Path, text: str = SMALL, name: str = "train.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mlc_train(
    config: Path, runs: Path, *sets: str, nproc: int = 1, env: dict[str, str] | None = None, check: bool = True,
    args: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """`mlc train` as a user runs it (torchrun for nproc > 1), one thread per process on the shared cores."""
    argv = [sys.executable, "-m", "mlc", "--runs-dir", str(runs), "train", str(config), "--json"]
    for s in sets:
        argv += ["--set", s]
    if nproc > 1:
        argv += ["--nproc-per-node", str(nproc)]
    argv += list(args)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(argv, capture_output=True, text=True, env=environment, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"mlc train failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_runs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if (p / "run.json").is_file()) if runs.is_dir() else []


def metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def segments(run_dir: Path) -> list[dict[int, float]]:
    """The loss curve of each stretch of a run between resumes."""
    out: list[dict[int, float]] = [{}]
    for m in metrics(run_dir):
        if m.get("event") == "resume":
            out.append({})
        elif "loss" in m:
            out[-1][m["step"]] = m["loss"]
    return out


def loss_curve(run_dir: Path) -> dict[int, float]:
    """Training loss by step; a step repeated after a resume keeps its last value."""
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture(scope="session")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SMALL on one process, uninterrupted, the reference of the multi-process tests: its run directory, loss curve
    and the trace of the samples it read (MFU against a peak of 1e12 FLOP/s)."""
    tmp = tmp_path_factory.mktemp("one")
    runs, trace = tmp / "runs", tmp / "trace.jsonl"
    mlc_train(write_config(tmp), runs, env={"MLC_TRAIN_TRACE_SAMPLES": str(trace)}, args=("--peak-flops", "1e12"))
    (run,) = train_runs(runs)
    return {"run": run, "curve": loss_curve(run), "trace": trace}
