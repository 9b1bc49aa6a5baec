"""Progress of a quantize run: a rich bar on a terminal, otherwise plain lines on stderr with elapsed time and ETA.

Quantising can take minutes (calibration, perplexity), so a run without a terminal (a pipe, a CI log, `--json`)
still says what it is doing: one line per step when steps are slow, at most one per tenth of the work when they
are quick. stdout stays for the report (and its JSON); -q silences both.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Callable, Iterator, TextIO

Tick = Callable[[str, int, int], None]  # (what, done, total)

LINE_EVERY_S = 5.0  # a step that ends this long after the last line gets its own line


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLines:
    """`quantize: <what> <done>/<total> (<pct>%) elapsed m:ss, ETA m:ss` lines for logs and pipes."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.monotonic):
        self.stream, self.clock = stream, clock
        self.phase: str | None = None
        # A phase's clock starts where the previous tick left off: its first step is timed too.
        self.last_tick = self.clock()
        self.started = self.last_line = 0.0
        self.last_tenth = -1

    def __call__(self, what: str, done: int, total: int) -> None:
        now = self.clock()
        if what != self.phase:
            self.phase, self.started, self.last_tenth = what, self.last_tick, -1
        self.last_tick = now
        if done == 0:
            self.started = now
            self._line(f"{what} ...", now)
            return
        tenth = 10 * done // max(total, 1)
        if done < total and tenth == self.last_tenth and now - self.last_line < LINE_EVERY_S:
            return
        self.last_tenth = tenth
        elapsed = now - self.started
        text = f"{what} {done}/{total} ({100 * done // max(total, 1)}%) elapsed {_clock(elapsed)}"
        if 0 < done < total:
            text += f", ETA {_clock(elapsed / done * (total - done))}"
        self._line(text, now)

    def _line(self, text: str, now: float) -> None:
        self.last_line = now
        self.stream.write(f"quantize: {text}\n")
        self.stream.flush()


@contextlib.contextmanager
def progress() -> Iterator[Tick | None]:
    """A tick function for the run: rich on a terminal, lines otherwise (also with --json); None with -q."""
    from mlc import console, options

    if options.get().verbosity < 0:
        yield None
        return
    if not console.err.is_terminal:
        yield ProgressLines(sys.stderr)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console.err, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def tick(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield tick
