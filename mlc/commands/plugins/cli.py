"""List installed plugins: commands, merge methods, quantisation schemes and formats."""

from __future__ import annotations

import typer

from mlc.cliutil import new_app

app = new_app(no_args_is_help=False)


@app.command()
def plugins(
    json_output: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout."),
    load: bool = typer.Option(True, "--load/--no-load", help="Import each plugin to check it loads."),
) -> None:
    """List every plugin with its package and version, and any that failed to import."""
    from rich.table import Table

    from mlc import console, options
    from mlc import plugins as registry

    rows = []
    for kind in registry.GROUPS:
        for plugin in registry.discover(kind):
            if load and not plugin.error:
                try:
                    plugin.load()
                except registry.PluginLoadError:
                    pass
            rows.append(plugin.describe())
    if options.want_json(json_output):
        console.print_json(rows)
        return
    table = Table("kind", "name", "package", "version", "status")
    for r in rows:
        status = "[green]ok[/green]" if r["status"] == "ok" else f"[red]failed[/red]: {r['error']}"
        table.add_row(r["kind"], r["name"], r["package"], r["version"], status)
    console.out.print(table)
