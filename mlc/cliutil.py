"""Helpers for command plugins' Typer apps: one look and fast --help everywhere."""

from __future__ import annotations

import typer

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def new_app(help: str | None = None, no_args_is_help: bool = True) -> typer.Typer:
    """A Typer sub-app for a command plugin: plain click help (fast: no rich import), no completion flags."""
    return typer.Typer(
        help=help,
        add_completion=False,
        no_args_is_help=no_args_is_help,
        rich_markup_mode=None,
        context_settings=CONTEXT,
        pretty_exceptions_enable=False,
    )


def json_option() -> bool:
    return typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


def parse_shard_size(text: str) -> int:
    """Bytes for --max-shard-size from '5GB', '500MB', '2GiB' or a plain number; a usage error otherwise."""
    from mlc.units import parse_size

    try:
        value = parse_size(text)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--max-shard-size") from None
    if value <= 0:
        raise typer.BadParameter(f"{text!r} is not a positive size like 5GB", param_hint="--max-shard-size")
    return value
