"""Inspect run directories: ls, show, lineage, gc, reindex, and ui (a local dashboard in the browser)."""

from __future__ import annotations

import typer

from mlc.cliutil import new_app

app = new_app("Inspect run directories: ls, show, lineage, gc, reindex, and ui (a local dashboard in the browser).")
JSON = typer.Option(False, "--json", help="Machine-readable JSON on stdout.")


def _root():
    from mlc import options

    return options.get().runs_dir.absolute()


@app.command("ls")
def ls(
    command: str = typer.Option(None, "--command", "-c", help="Only runs of this command."),
    status: str = typer.Option(None, "--status", help="Only runs with this status (running, completed, failed, interrupted)."),
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many runs, newest first."),
    json_output: bool = JSON,
) -> None:
    """List runs, newest first."""
    from rich.table import Table

    from mlc import console, options
    from mlc.runs import index

    runs = index.query_runs(_root(), command=command, status=status, limit=limit)
    if options.want_json(json_output):
        console.print_json(runs)
        return
    table = Table("run", "command", "status", "started", "artifacts")
    colours = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "blue"}
    for r in runs:
        c = colours.get(r["status"], "white")
        table.add_row(r["id"], r["command"], f"[{c}]{r['status']}[/{c}]", r["started"], ", ".join(r.get("artifacts", {})))
    console.out.print(table)


@app.command("show")
def show(ref: str = typer.Argument(..., help="A run: run:<id>, an id, or latest:<command>."), json_output: bool = JSON) -> None:
    """Show one run's record: status, config, inputs, artifacts, summary."""
    from mlc import console, options
    from mlc.runs import read_run

    record = read_run(_run_path(ref))
    if options.want_json(json_output):
        console.print_json({**record.data, "path": str(record.path)})
        return
    d = record.data
    console.out.print(f"[bold]{d['id']}[/bold]  {d['command']}  {d['status']}  ({record.path})")
    console.out.print(f"argv: {' '.join(d['argv'])}")
    console.out.print(f"started {d['started']}  ended {d.get('ended')}  pid {d['pid']} on {d['host']}")
    if d.get("error"):
        console.out.print(f"[red]error:[/red] {d['error']}")
    for i in d.get("inputs", []):
        src = f" (from run {i['producer_run']})" if i.get("producer_run") else ""
        console.out.print(f"input  {i['role']}: {i['path']} {i['hash'][:19]}{src}")
    for name, a in d.get("artifacts", {}).items():
        console.out.print(f"artifact {name} ({a['kind']}): {a['path']} {a['hash'][:19]}")
    for k, v in d.get("summary", {}).items():
        console.out.print(f"{k}: {v}")


def _run_path(ref: str):
    from mlc.runs import index
    from mlc.runs.refs import find_run

    if ref.startswith("latest:"):
        runs = index.query_runs(_root(), command=ref[7:], limit=1)
        if not runs:
            from mlc.errors import InputError

            raise InputError(f"no {ref[7:]} run under {_root()}", "list runs with `mlc runs ls`")
        return runs[0]["path"]
    return find_run(_root(), ref.removeprefix("run:"))


@app.command("lineage")
def lineage_cmd(
    ref: str = typer.Argument(..., help="An artifact: a path, run:<id>[/<artifact>], latest:<command>."),
    json_output: bool = JSON,
) -> None:
    """Print the tree of runs and artifacts that led to an artifact."""
    from mlc import console, options
    from mlc.runs.lineage import as_rich_tree, lineage

    tree = lineage(_root(), ref)
    if options.want_json(json_output):
        console.print_json(tree)
    else:
        console.print_whole(as_rich_tree(tree))


@app.command("gc")
def gc(
    status: list[str] = typer.Option(["failed", "interrupted"], "--status", help="Remove runs with these statuses."),
    older_than: float = typer.Option(0.0, "--older-than", help="Only runs that ended (or started) more than this many days ago."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
    json_output: bool = JSON,
) -> None:
    """Remove failed and interrupted runs (never running ones, nor runs others were built from) and stale temp files."""
    from mlc import console, options
    from mlc.runs.gc import collect

    removed = collect(_root(), set(status), older_than, dry_run)
    if options.want_json(json_output):
        console.print_json({"dry_run": dry_run, "removed": removed})
        return
    verb = "would remove" if dry_run else "removed"
    for item in removed:
        console.out.print(f"{verb} {item}")
    console.info(f"{verb} {len(removed)} item(s)")


@app.command("reindex")
def reindex(json_output: bool = JSON) -> None:
    """Rebuild the SQLite index from the run directories."""
    from mlc import console, options
    from mlc.runs import index

    n = index.reindex(_root())
    if options.want_json(json_output):
        console.print_json({"runs": n, "index": str(_root() / index.INDEX_FILE)})
    else:
        console.out.print(f"indexed {n} runs in {_root() / index.INDEX_FILE}")


@app.command("ui")
def ui(
    port: int = typer.Option(8765, "--port", help="TCP port (0 picks a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. The default serves this machine only; the UI has no login, so "
                             "another address shows every run to whoever can reach it."),
) -> None:
    """Serve a read-only dashboard of the runs root: runs, curves, result views and lineage, at http://HOST:PORT/."""
    from mlc.commands.runs.ui.serve import serve

    serve(_root(), host, port)
