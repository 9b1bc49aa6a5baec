"""Output: data on stdout (rich for people, JSON for machines), messages on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from mlc import options

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def info(message: str) -> None:
    """A progress or status message for people; silenced by -q."""
    if options.get().verbosity >= 0 and not options.get().json:
        err.print(message, highlight=False)


def verbose(message: str) -> None:
    if options.get().verbosity >= 1:
        err.print(f"[dim]{message}[/dim]", highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)


def print_whole(renderable: Any) -> None:
    """Print a tree or table to stdout. Off a terminal (a pipe, a file) rich would cut every line at 80 columns, and a
    path cut short is a wrong path: there, lines are as long as they need to be."""
    if out.is_terminal:
        out.print(renderable)
    else:
        Console(file=out.file, width=100_000, soft_wrap=True).print(renderable)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def progress_enabled() -> bool:
    return options.get().verbosity >= 0 and not options.get().json and err.is_terminal
