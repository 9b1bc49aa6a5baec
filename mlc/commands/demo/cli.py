"""Run the whole model lifecycle on the bundled tiny model and corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mlc.cliutil import new_app

app = new_app(no_args_is_help=False)


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where the demo writes configs and models (default: inside its run directory)."),
    base_steps: int = typer.Option(80, "--base-steps", help="Pretraining steps of the tiny base model."),
    chat_steps: int = typer.Option(30, "--chat-steps", help="Chat fine-tuning steps (2 processes)."),
    moe_steps: int = typer.Option(10, "--moe-steps", help="Training steps of the upcycled MoE."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Serve the quantised model and ask it a question."),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable summary on stdout."),
) -> None:
    """Train, merge, evaluate, quantise, upcycle and serve the bundled tiny model; print what was made and where.

    Every stage is a real `mlc` command run in its own process and recorded as a run under --runs-dir, so
    `mlc runs ls` and `mlc runs lineage` show the whole story afterwards.
    """
    from mlc.commands.demo.runner import run_demo

    run_demo(workdir, base_steps, chat_steps, moe_steps, serve, json_output)
