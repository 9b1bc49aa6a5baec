"""The lineage graph around one run or artifact: back to the data it came from, forward to everything made from it.

Nodes are runs, the artifacts they made, and files with no recorded producer (data, a model from elsewhere),
keyed by content hash so a corpus read by five runs is one node. An edge says "was used by" (artifact or file
-> run, labelled with the input's role) or "made" (run -> artifact). mlc.runs.lineage walks one direction as
a tree for the terminal; this walks both over the records already read (a Catalog's), touching no file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterable

from mlc.runs.record import RunRecord


@dataclass
class Node:
    id: str  # run:<id>, art:<run id>/<name>, file:<hash>
    kind: str  # run, artifact, file, missing
    label: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Graph:
    nodes: dict[str, Node]
    edges: list[tuple[str, str, str]]  # (from, to, label)
    focus: str


def run_node(run_id: str) -> str:
    return f"run:{run_id}"


def artifact_node(run_id: str, name: str) -> str:
    return f"art:{run_id}/{name}"


class _Records:
    """What the walk needs, indexed once: runs by id, artifacts by hash, and who used each artifact."""

    def __init__(self, records: Iterable[RunRecord]):
        self.runs = {r.id: r for r in records}
        self.by_hash: dict[str, str] = {}
        for r in sorted(self.runs.values(), key=lambda r: str(r.data.get("started", ""))):
            for name, a in _artifacts(r).items():
                self.by_hash.setdefault(str(a.get("hash")), artifact_node(r.id, name))
        self.users: dict[str, list[tuple[str, str]]] = {}  # source node -> [(run id, role)]
        for r in self.runs.values():
            for inp in _inputs(r):
                self.users.setdefault(self.source(inp), []).append((r.id, str(inp.get("role") or "input")))

    def source(self, inp: dict[str, Any]) -> str:
        """The node an input came from: the producing run's artifact, an artifact with its hash, the run, or a file."""
        producer, artifact = inp.get("producer_run"), inp.get("producer_artifact")
        if isinstance(producer, str) and producer:
            return artifact_node(producer, str(artifact)) if artifact else run_node(producer)
        known = self.by_hash.get(str(inp.get("hash")))
        return known or f"file:{inp.get('hash')}"


def lineage_graph(records: Iterable[RunRecord], run_id: str, artifact: str | None = None) -> Graph:
    """The graph through run_id (or through one of its artifacts): all its ancestors and all its descendants."""
    idx = _Records(records)
    nodes: dict[str, Node] = {}
    edges: set[tuple[str, str, str]] = set()
    focus = artifact_node(run_id, artifact) if artifact else run_node(run_id)
    _add(idx, nodes, focus)
    if artifact:
        edges.add((run_node(run_id), focus, "made"))
        _add(idx, nodes, run_node(run_id))
    _walk_back(idx, nodes, edges, run_id)
    starts = [focus]
    if not artifact:
        for name in _artifacts(idx.runs.get(run_id)):
            starts.append(artifact_node(run_id, name))
            _add(idx, nodes, starts[-1])
            edges.add((focus, starts[-1], "made"))
    _walk_forward(idx, nodes, edges, starts)
    return Graph(nodes, sorted(edges), focus)


def _walk_back(idx: _Records, nodes: dict[str, Node], edges: set, run_id: str) -> None:
    todo, seen = [run_id], set()
    while todo:
        rid = todo.pop()
        if rid in seen or rid not in idx.runs:
            continue
        seen.add(rid)
        for inp in _inputs(idx.runs[rid]):
            src = idx.source(inp)
            _add(idx, nodes, src)
            edges.add((src, run_node(rid), str(inp.get("role") or "input")))
            producer = _run_of(src)
            if producer:
                if src.startswith("art:"):
                    _add(idx, nodes, run_node(producer))
                    edges.add((run_node(producer), src, "made"))
                todo.append(producer)


def _walk_forward(idx: _Records, nodes: dict[str, Node], edges: set, starts: list[str]) -> None:
    todo, seen = list(starts), set()
    while todo:
        src = todo.pop()
        if src in seen:
            continue
        seen.add(src)
        for user, role in idx.users.get(src, []):
            _add(idx, nodes, run_node(user))
            edges.add((src, run_node(user), role))
            todo.append(run_node(user))  # inputs given as run:<id> (no artifact) point at the run itself
            for name in _artifacts(idx.runs.get(user)):
                node = artifact_node(user, name)
                _add(idx, nodes, node)
                edges.add((run_node(user), node, "made"))
                todo.append(node)


def _run_of(node: str) -> str | None:
    if node.startswith("run:"):
        return node[4:]
    if node.startswith("art:"):
        return node[4:].partition("/")[0]  # a run id has no slash; an artifact name may (checkpoints/step-00000020)
    return None


def _add(idx: _Records, nodes: dict[str, Node], node: str) -> None:
    if node in nodes:
        return
    if node.startswith("file:"):
        nodes[node] = _file_node(idx, node)
        return
    run_id = _run_of(node) or ""
    record = idx.runs.get(run_id)
    if record is None:
        nodes[node] = Node(node, "missing", run_id, {"run": run_id})
    elif node.startswith("run:"):
        d = record.data
        nodes[node] = Node(node, "run", str(d.get("command")), {"run": run_id, "status": record.status, "started": d.get("started")})
    else:
        name = node[4:].partition("/")[2]
        a = _artifacts(record).get(name)
        if a is None:  # a part of the run named by an input (a training checkpoint), not one of its recorded artifacts
            nodes[node] = Node(node, "artifact", name, {"run": run_id, "kind": "part of the run", "recorded": False})
        else:
            nodes[node] = Node(node, "artifact", name, {"run": run_id, "kind": a.get("kind"), "path": a.get("path"), "hash": a.get("hash"), "recorded": True})


def _file_node(idx: _Records, node: str) -> Node:
    digest = node[5:]
    for r in idx.runs.values():
        for inp in _inputs(r):
            if str(inp.get("hash")) == digest and not inp.get("producer_run"):
                path = str(inp.get("path") or "")
                return Node(node, "file", PurePath(path).name or path, {"path": path, "hash": digest})
    return Node(node, "file", digest[:19], {"hash": digest})


def _inputs(record: RunRecord | None) -> list[dict[str, Any]]:
    items = record.data.get("inputs") if record is not None else None
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _artifacts(record: RunRecord | None) -> dict[str, dict[str, Any]]:
    items = record.data.get("artifacts") if record is not None else None
    return {str(k): v for k, v in items.items() if isinstance(v, dict)} if isinstance(items, dict) else {}
