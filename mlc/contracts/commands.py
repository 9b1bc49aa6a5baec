"""The command contract: what an `mlc.commands.v1` plugin provides.

An entry point `name = "module:app"` names a Typer app (or a click command); `mlc name ...` runs it.
The first line of the module's docstring is the command's one-line help in `mlc --help`, read from
source without importing the module, so keep that module light: build the app with
`mlc.cliutil.new_app()` and import heavy things (torch, the capability) inside the command
functions. A command that produces something opens a run (`mlc.runs.open_run`); failures the user
can fix are raised as `mlc.errors.MlcError` (one line with a hint, non-zero exit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import click


def command_of(obj: Any) -> click.Command | None:
    """The click command a command plugin's object stands for, or None when it is neither Typer nor click."""
    import click
    import typer

    if isinstance(obj, typer.Typer):
        return typer.main.get_command(obj)
    return obj if isinstance(obj, click.Command) else None
