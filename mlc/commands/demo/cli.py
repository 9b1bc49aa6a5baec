"""Run the whole model lifecycle on the bundled tiny model and corpus."""

from __future__ import annotations

import typer

from mlc.cliutil import new_app

app = new_app(no_args_is_help=False)


@app.command()
def demo() -> None:
    """Run every lifecycle stage on the bundled tiny model and corpus, and print what it made."""
    raise NotImplementedError
