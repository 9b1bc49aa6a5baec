"""The extension contracts: what a plugin implements, and the one mlc module a third party imports.

    commands       mlc.commands.v1        a Typer app (mlc.contracts.commands)
    merge_methods  mlc.merge_methods.v1   a MergeMethod, made with @merge_method (mlc.contracts.merge)
    quant_schemes  mlc.quant_schemes.v1   a QuantScheme (mlc.contracts.quantize)
    formats        mlc.formats.v1         a CheckpointFormat and the Checkpoint it opens (mlc.contracts.formats)

The built-ins implement the same contracts and register through the same entry points. Discovery
(`mlc.plugins`) checks each loaded object with `plugin_problem` and reports a wrong type as a broken
plugin. Importing this package imports no torch, so `mlc --help` and `mlc plugins` stay fast.
"""

from __future__ import annotations

from typing import Any

from mlc.contracts.commands import command_of
from mlc.contracts.formats import Checkpoint, CheckpointFormat, ConvertOptions, TensorEntry, format_problem
from mlc.contracts.merge import REQUIRED, BasePolicy, MergeMethod, Param, in_range, merge_method
from mlc.contracts.quantize import QuantScheme, SchemeOptions

__all__ = [
    "REQUIRED", "BasePolicy", "Checkpoint", "CheckpointFormat", "ConvertOptions", "MergeMethod", "Param",
    "QuantScheme", "SchemeOptions", "TensorEntry", "command_of", "in_range", "merge_method", "plugin_problem",
]


def _expected(kind: str) -> tuple[tuple[type, ...], str, str]:
    """(accepted types, their name, how to fix) for one plugin kind."""
    if kind == "commands":
        import click
        import typer

        return (typer.Typer, click.Command), "Typer app or click command", "build it with mlc.cliutil.new_app()"
    return {
        "merge_methods": ((MergeMethod,), "MergeMethod", "declare it with @mlc.contracts.merge_method"),
        "quant_schemes": ((QuantScheme,), "QuantScheme", "make it an mlc.contracts.QuantScheme"),
    }[kind]


def plugin_problem(kind: str, obj: Any) -> str | None:
    """Why obj cannot be a plugin of this kind (a key of mlc.plugins.GROUPS), or None when it can."""
    if kind == "formats":  # a Protocol with an optional method and a legacy alternative: checked by attribute
        why = format_problem(obj)
        return None if why is None else f"{_what(obj)} is not a CheckpointFormat: {why}"
    types, expected, hint = _expected(kind)
    if isinstance(obj, types):
        return None
    return f"{_what(obj)} is not a {expected}; {hint}"


def _what(obj: Any) -> str:
    name = getattr(obj, "__name__", None)
    return f"{type(obj).__name__} {name!r}" if name else f"a {type(obj).__name__}"
