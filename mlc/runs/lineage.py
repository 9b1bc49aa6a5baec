"""Lineage: the tree of runs and artifacts that led to an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlc.errors import InputError
from mlc.runs import hashing
from mlc.runs.record import read_run
from mlc.runs.refs import find_run, resolve
from mlc.runs.rundir import find_producer


def lineage(runs_root: Path, ref: str) -> dict[str, Any]:
    """A nested dict: the artifact, the run that made it, and recursively that run's inputs."""
    if ref.startswith("run:") and "/" not in ref:
        record = read_run(find_run(runs_root, ref[4:]))
        return _run_node(runs_root, record.path, None, set())
    resolved = resolve(ref, runs_root)
    run_id, artifact = resolved.run_id, resolved.artifact
    content = hashing.content_hash(resolved.path)
    if run_id is None:
        found = find_producer(runs_root, resolved.path, content)
        if found is None:
            return {"type": "file", "path": str(resolved.path), "hash": content, "producer": None}
        run_id, artifact = found
    try:
        run_path = find_run(runs_root, run_id)
    except InputError:
        return {"type": "artifact", "path": str(resolved.path), "hash": content, "producer": {"run": run_id, "missing": True}}
    return _run_node(runs_root, run_path, artifact, set())


def _run_node(runs_root: Path, run_path: Path, artifact: str | None, seen: set[str]) -> dict[str, Any]:
    data = read_run(run_path).data
    node: dict[str, Any] = {
        "type": "run",
        "run": data["id"],
        "command": data["command"],
        "status": data["status"],
        "started": data["started"],
        "artifact": artifact,
        "artifact_path": data.get("artifacts", {}).get(artifact, {}).get("path") if artifact else None,
        "inputs": [],
    }
    if data["id"] in seen:
        node["cycle"] = True
        return node
    seen = seen | {data["id"]}
    for inp in data.get("inputs", []):
        producer = inp.get("producer_run")
        if producer:
            try:
                child = _run_node(runs_root, find_run(runs_root, producer), inp.get("producer_artifact"), seen)
            except InputError:
                child = {"type": "run", "run": producer, "missing": True, "inputs": []}
        else:
            child = {"type": "file", "path": inp["path"], "hash": inp["hash"]}
        child["role"] = inp.get("role")
        node["inputs"].append(child)
    return node


def as_rich_tree(node: dict[str, Any]):  # -> rich.tree.Tree
    from rich.tree import Tree

    tree = Tree(_label(node))
    _add_children(tree, node)
    return tree


def _add_children(tree: Any, node: dict[str, Any]) -> None:
    for child in node.get("inputs", []):
        branch = tree.add(_label(child))
        _add_children(branch, child)


def _label(node: dict[str, Any]) -> str:
    role = f"[dim]{node['role']}:[/dim] " if node.get("role") else ""
    if node["type"] == "file":
        return f"{role}[cyan]{node['path']}[/cyan] [dim]{node['hash'][:19]}[/dim] (no recorded producer)"
    if node.get("missing"):
        return f"{role}run [bold]{node['run']}[/bold] [red](run directory missing)[/red]"
    art = f" -> [green]{node['artifact']}[/green]" if node.get("artifact") else ""
    colour = {"completed": "green", "failed": "red", "interrupted": "yellow"}.get(node["status"], "blue")
    return f"{role}[bold]{node['command']}[/bold] run {node['run']} [{colour}]{node['status']}[/{colour}]{art}"
