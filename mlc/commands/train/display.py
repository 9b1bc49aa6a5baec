"""Where rank 0's figures go: metrics.jsonl, TensorBoard event files, and a live display for people."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlc import console
from mlc.runs import Run


class MetricsSink:
    """metrics.jsonl always; TensorBoard events under <run>/tensorboard when the package is importable."""

    def __init__(self, run: Run, tensorboard: bool):
        self.run = run
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # said out loud, not silently skipped: metrics.jsonl still has every figure
                message = (
                    "log.tensorboard is on but the tensorboard package is not installed: "
                    "pip install tensorboard, or set log.tensorboard = false; metrics.jsonl has the figures"
                )
                console.warn(message)
                run.log(message)
            else:
                self.writer = SummaryWriter(log_dir=str(Path(run.path) / "tensorboard"))

    def log(self, values: dict[str, Any]) -> None:
        self.run.log_metrics(values)
        if self.writer is not None and "step" in values:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(latest: dict[str, Any]) -> str:
    parts = [f"loss {latest['loss']:.4f}"] if "loss" in latest else []
    if "margin" in latest:
        parts.append(f"margin {latest['margin']:.3f}")
    if "lr" in latest:
        parts.append(f"lr {latest['lr']:.2e}")
    if "grad_norm" in latest:
        parts.append(f"gnorm {latest['grad_norm']:.3f}")
    if "tokens_per_s" in latest:
        parts.append(f"{latest['tokens_per_s']:,.0f} tok/s")
    if latest.get("mfu") is not None:
        parts.append(f"MFU {100 * latest['mfu']:.1f}%")
    if "eval_loss" in latest:
        parts.append(f"eval {latest['eval_loss']:.4f}" + (f" (ppl {latest['eval_ppl']:.2f})" if "eval_ppl" in latest else ""))
    if "eval_margin" in latest:
        parts.append(f"eval margin {latest['eval_margin']:.3f}")
    return "  ".join(parts)


class LiveDisplay:
    """A rich progress bar with ETA and the latest figures on a terminal; a line every ~10% otherwise."""

    def __init__(self, total: int, start: int):
        self.total, self.start = total, start
        self.latest: dict[str, Any] = {}
        self.progress = None
        self.every = max(1, total // 10)
        self.started = time.monotonic()

    def __enter__(self) -> "LiveDisplay":
        if console.progress_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[figures]}"),
                console=console.err, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.start, figures="")
        return self

    def update(self, step: int, values: dict[str, Any]) -> None:
        self.latest.update(values)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, figures=_fmt(self.latest))
        elif step % self.every == 0 or step == self.total:
            console.info(f"step {step}/{self.total}  {_fmt(self.latest)}")

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
