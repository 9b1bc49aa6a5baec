"""The mlc root command: global options, a lazy table of command plugins, and the error boundary.

`mlc --help` builds the command table from entry-point metadata and module docstrings read from
source, so it imports neither torch nor any command module. A command's module is imported only
when that command runs (or its own --help is asked for).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import click
import typer
from typer.core import TyperGroup

from mlc import __version__, options, plugins
from mlc.cliutil import CONTEXT
from mlc.errors import MlcError


class LazyCommandGroup(TyperGroup):
    """A group whose subcommands come from the mlc.commands.v1 entry points, imported on use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(plugins.available("commands"))

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        # Used for listing and help: a cheap stand-in carrying the one-line help, no import.
        plugin = plugins.available("commands").get(name)
        if plugin is None:
            return None
        return click.Command(name, help=plugin.help_line(), short_help=plugin.help_line())

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        # Used when a subcommand is actually run (or completed): import it now.
        name = click.utils.make_str(args[0]) if args else None
        plugin = plugins.available("commands").get(name or "")
        if plugin is None:
            return super().resolve_command(ctx, args)
        return name, load_command(plugin), args[1:]


def load_command(plugin: plugins.Plugin) -> click.Command:
    from mlc.contracts import command_of

    try:
        obj = plugin.load()
    except plugins.PluginLoadError as e:
        raise MlcError(str(e), f"reinstall {plugin.package}, or leave it out with MLC_LOAD_PLUGINS") from None
    command = command_of(obj)  # load() checked the type: a Typer app or click command
    assert command is not None
    command.name = plugin.name
    return command


app = typer.Typer(
    cls=LazyCommandGroup,
    name="mlc",
    help="mlc: the model lifecycle command line. Train, convert, merge, upcycle, quantize, evaluate, serve and benchmark language models; every command records a run.",
    no_args_is_help=True,
    context_settings=CONTEXT,
    rich_markup_mode=None,  # plain click help: importing rich's markdown renderer alone costs ~50 ms
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlc {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    runs_dir: Path = typer.Option(
        Path("runs"), "--runs-dir", envvar="MLC_RUNS_DIR", help="Where run directories and their index live."
    ),
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More detail on stderr."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    debug: bool = typer.Option(False, "--debug", envvar="MLC_DEBUG", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    options.set_options(
        options.GlobalOptions(runs_dir=runs_dir, json=json_output, verbosity=-1 if quiet else verbose, debug=debug)
    )


def _print_error(text: str) -> None:
    from rich.markup import escape

    from mlc.console import err

    # The message is plain text: "[start, end]" in it is not markup.
    err.print(f"[bold red]error:[/bold red] {escape(text)}", highlight=False, markup=True, soft_wrap=True)


def main(argv: list[str] | None = None) -> Any:
    """Run the CLI: one-line errors (tracebacks with --debug), exit 1 for errors, 2 for usage, 130 for Ctrl-C."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or options.get().debug
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=args, prog_name="mlc", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _print_error("interrupted")
        sys.exit(130)
    except MlcError as e:
        if debug:
            traceback.print_exc()
        _print_error(e.one_line())
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the error boundary: an unexpected error is one line too (--debug for more)
        if debug:
            traceback.print_exc()
        first = (str(e).splitlines() or [""])[0]
        _print_error(f"{e.__class__.__name__}: {first} (an unexpected error: rerun with --debug for the traceback)")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)
